"""Fused uvqk / hstu_output Triton kernels against the reference ops, in Triton's interpreter.

fp32 and fp16 (the interpreter's bf16 tl.dot is wrong, see test_hstu_attention_triton.py); bf16 runs in
benchmarks/gpu_hstu.py on the H200. Sizes are deliberately not multiples of the tiles (D=50, 37 rows),
the norms' parameters are non-trivial and the inputs carry an offset, so a skipped mask, a swapped
weight/bias or a badly centred variance shows.
"""

import inspect

import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: E402,F401 (before the kernels)

pytestmark = needs_triton

from hstu_opt import ops  # noqa: E402
from hstu_opt.model.layout import Jagged  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from tests.conftest import TOLERANCES  # noqa: E402
from tests.ops.test_projections import _layer  # noqa: E402


def _params(D, H, dqk, dv, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    width = H * (2 * dv + 2 * dqk)
    return dict(
        norm_weight=torch.rand(D, generator=g) + 0.5, norm_bias=torch.randn(D, generator=g) * 0.3,
        uvqk_weight=(torch.randn(D, width, generator=g) * D ** -0.5).to(dtype),
        uvqk_bias=(torch.randn(width, generator=g) * 0.1).to(dtype),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,D,H,dqk,dv", [(1, 16, 1, 8, 8), (37, 50, 2, 16, 24), (70, 48, 3, 50, 16)])
def test_uvqk_matches_reference(dtype, M, D, H, dqk, dv):
    _check_uvqk(dtype, M, D, H, dqk, dv)


def _check_uvqk(dtype, M, D, H, dqk, dv):
    """Triton uvqk against the reference on an offset input; returns (x, (u, q, k, v))."""
    p = _params(D, H, dqk, dv, dtype, seed=M + D)
    x = (torch.randn(M, D, generator=torch.Generator().manual_seed(M)) * 2 + 3).to(dtype)
    kw = dict(num_heads=H, attention_dim=dqk, linear_dim=dv)
    args = (p["norm_weight"], p["norm_bias"], p["uvqk_weight"], p["uvqk_bias"])
    want = ops.uvqk(x.float(), *(a.float() for a in args), **kw)
    got = ops.uvqk(x, *args, impl=Impl.TRITON, **kw)
    atol, rtol = TOLERANCES[dtype]
    for name, g, w in zip("uqkv", got, want):
        assert g.shape == w.shape and g.dtype == dtype, name
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return x, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,D,H,dqk,dv", [(1, 16, 1, 8, 8), (37, 50, 2, 16, 24)])
@pytest.mark.parametrize("gather", [False, True])
def test_uvqk_kv_is_the_k_and_v_of_uvqk(dtype, M, D, H, dqk, dv, gather):
    """k and v of uvqk; with `rows`, of those rows (gathered by the norm's loads: shuffled, repeated, fewer
    or more rows than x has), into NaN-free outputs of the gathered length."""
    p = _params(D, H, dqk, dv, dtype, seed=M + D + 1)
    x = (torch.randn(M, D, generator=torch.Generator().manual_seed(M)) * 2 + 3).to(dtype)
    kw = dict(num_heads=H, attention_dim=dqk, linear_dim=dv)
    args = (p["norm_weight"], p["norm_bias"], p["uvqk_weight"], p["uvqk_bias"])
    rows = torch.randint(0, M, (M + 5,), generator=torch.Generator().manual_seed(M + 1)) if gather else None
    _, _, k_want, v_want = ops.uvqk(x.float() if rows is None else x.float()[rows], *(a.float() for a in args), **kw)
    k, v = ops.uvqk_kv(x, *args, rows=rows, impl=Impl.TRITON, **kw)
    atol, rtol = TOLERANCES[dtype]
    assert k.shape == k_want.shape and v.shape == v_want.shape and k.dtype == v.dtype == dtype
    torch.testing.assert_close(k.float(), k_want, atol=atol, rtol=rtol)
    torch.testing.assert_close(v.float(), v_want, atol=atol, rtol=rtol)


def test_uvqk_outputs_are_strided_views_the_attention_reads_as_they_are():
    p = _params(16, 2, 8, 8, torch.float32, seed=1)
    u, q, k, v = ops.uvqk(torch.randn(5, 16), *p.values(), num_heads=2, attention_dim=8, linear_dim=8, impl=Impl.TRITON)
    width = 2 * (2 * 8 + 2 * 8)
    assert q.stride() == (width, 8, 1) and k.stride() == (width, 8, 1) and u.stride() == (width, 1)
    assert q.untyped_storage().data_ptr() == u.untyped_storage().data_ptr()  # one buffer, no split copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,HV,D", [(1, 16, 16), (37, 48, 50), (70, 100, 40)])
def test_hstu_output_matches_reference(dtype, M, HV, D):
    g = torch.Generator().manual_seed(M + HV)
    u = torch.randn(M, HV, generator=g).to(dtype)
    a = (torch.randn(M, HV, generator=g) * 0.2 + 0.05).to(dtype)  # attention outputs are small (1/N scale)
    x = torch.randn(M, D, generator=g).to(dtype)
    nw, nb = torch.rand(HV, generator=g) + 0.5, torch.randn(HV, generator=g) * 0.3
    w = (torch.randn(3 * HV, D, generator=g) * (3 * HV) ** -0.5).to(dtype)
    want = ops.hstu_output(u.float(), a.float(), x.float(), nw, nb, w.float())
    got = ops.hstu_output(u, a, x, nw, nb, w, impl=Impl.TRITON)
    atol, rtol = TOLERANCES[dtype]
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


def test_hstu_output_with_dropout_runs_the_reference():
    u, a, x = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    torch.manual_seed(0)
    want = ops.hstu_output(u, a, x, torch.ones(8), torch.zeros(8), torch.randn(24, 8), dropout=0.5)
    torch.manual_seed(0)
    got = ops.hstu_output(u, a, x, torch.ones(8), torch.zeros(8), torch.randn(24, 8), dropout=0.5, impl=Impl.TRITON)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stu_layer_all_triton_matches_reference(dtype):
    """The three Triton ops composed as the model composes them (strided views flowing between them),
    on jagged rows with targets and contextual rows."""
    D, H, dqk, dv = 50, 2, 32, 64  # (a mixed head-dim pair the router admits: triton.CHECKED_MIXED_DIMS)
    _, layer = _layer(D, H, dqk, dv, seed=3)
    offsets, nt = torch.tensor([0, 7, 8, 21]), torch.tensor([2, 0, 3])  # lengths 7, 1, 13
    x = torch.randn(21, D, generator=torch.Generator().manual_seed(4))
    want, _, _ = layer(x, Jagged(offsets, nt, 1))
    layer = layer.to(dtype)
    got, k, v = layer(x.to(dtype), Jagged(offsets, nt, 1), impl=Impl.TRITON)
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype and k.shape == (21, H, dqk) and v.shape == (21, H, dv)
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


def test_real_and_fake_signatures_agree():
    from hstu_opt.ops.hstu_output.triton import hstu_output_triton
    from hstu_opt.ops.uvqk.triton import uvqk_triton

    for op, name, n in ((uvqk_triton, "uvqk_triton", 8), (hstu_output_triton, "hstu_output_triton", 7)):
        real = [a.name for a in getattr(torch.ops.hstu_opt, name).default._schema.arguments]
        assert real == list(inspect.signature(op._abstract_fn).parameters) and len(real) == n


def test_fake_ops_give_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu_opt.ops.hstu_output.triton import hstu_output_triton
    from hstu_opt.ops.uvqk.triton import uvqk_triton

    with FakeTensorMode():
        x, w = torch.empty(9, 20), torch.empty(20, 64)
        assert uvqk_triton(x, torch.empty(20), torch.empty(20), w, torch.empty(64), 16, 1e-6).shape == (9, 64)
        rows = torch.empty(13, dtype=torch.int64)
        assert uvqk_triton(x, torch.empty(20), torch.empty(20), w, torch.empty(64), 0, 1e-6, rows).shape == (13, 64)
        u = torch.empty(9, 16)
        assert hstu_output_triton(u, u, x, torch.empty(16), torch.empty(16), torch.empty(48, 20), 1e-6).shape == (9, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,num_a", [(1, 16, 32, 1), (37, 48, 96, 1), (70, 40, 64, 3), (130, 72, 40, 2)])
@pytest.mark.parametrize("subtile,flatten", [(False, True), (True, False)])
def test_persistent_tma_gemm_matches_reference(dtype, M, K, N, num_a, subtile, flatten):
    """_gemm_tma_kernel (persistent, kernel-made TMA descriptors) with every epilogue piece on, on sizes
    that are not multiples of its tiles (M, K and N tails come from TMA's zero fill and clipped stores),
    three programs walking the tiles, into a NaN-poisoned output."""
    from hstu_opt.ops import _triton as tri

    g = torch.Generator().manual_seed(M + K + N)
    a = [torch.randn(M, K, generator=g).to(dtype) for _ in range(num_a)]
    w = (torch.randn(num_a * K, N, generator=g) * K ** -0.5).to(dtype)
    bias, res = torch.randn(N, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
    want = torch.cat([t.float() for t in a], dim=1) @ w.float() + bias.float()
    want[:, :N // 2] = torch.nn.functional.silu(want[:, :N // 2])
    want += res.float()
    used = []
    out = torch.full((M, N), float("nan")).to(dtype)
    tri.launch_gemm(a, w, out, lambda kernel: used.append(kernel.fn.__name__) or kernel, bias=bias, residual=res,
                    silu_cols=N // 2, config=dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, TMA=True, PROGRAMS=3,
                                                  SUBTILE=subtile, FLATTEN=flatten))
    assert used == ["_gemm_tma_kernel"]
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ops_through_the_tma_gemm_match_reference(dtype, monkeypatch):
    """uvqk and hstu_output with GEMM_FLAGS TMA on: the strided u view feeds hstu_output's descriptors."""
    from hstu_opt.ops import _triton as tri

    monkeypatch.setitem(tri.GEMM_FLAGS, "TMA", True)
    from hstu_opt.ops.hstu_output import triton as out_mod
    from hstu_opt.ops.uvqk import triton as uvqk_mod

    used = []

    def spy(a, weight, out, *args, **kwargs):
        used.append(tri.tma_ready(*a, weight, out))
        return tri.launch_gemm(a, weight, out, *args, **kwargs)

    monkeypatch.setattr(uvqk_mod, "launch_gemm", spy)
    monkeypatch.setattr(out_mod, "launch_gemm", spy)
    D, H, dqk, dv, M = 48, 2, 16, 24, 37
    x, (u, _, _, _) = _check_uvqk(dtype, M, D, H, dqk, dv)
    a = (torch.randn(M, H * dv, generator=torch.Generator().manual_seed(7)) * 0.2).to(dtype)
    nw, nb = torch.rand(H * dv) + 0.5, torch.randn(H * dv) * 0.3
    wo = (torch.randn(3 * H * dv, D) * (3 * H * dv) ** -0.5).to(dtype)
    want_o = ops.hstu_output(u.float(), a.float(), x.float(), nw, nb, wo.float())
    got_o = ops.hstu_output(u, a, x, nw, nb, wo, impl=Impl.TRITON)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got_o.float(), want_o, atol=atol, rtol=rtol)
    assert used == [True, True]  # both GEMMs could take the TMA kernel (u's row stride is uvqk's width)


def test_tma_ready_needs_aligned_rows():
    from hstu_opt.ops._triton import tma_ready

    x = torch.empty(10, 48, dtype=torch.float16)
    assert tma_ready(x, x[:, :16], torch.empty(48, 8, dtype=torch.float16))  # a column view keeps the row stride
    for bad in (torch.empty(10, 50, dtype=torch.float16),  # 100-byte rows
                torch.empty(48 * 10 + 4, dtype=torch.float16)[4:].view(10, 48),  # start not 16-byte aligned
                torch.empty(48, 10, dtype=torch.float16).t()):  # column stride not 1
        assert not tma_ready(x, bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_few_rows_through_cublas_match_reference(dtype, monkeypatch):
    """The few-rows route of the projections on a GPU (ops/_triton.cublas_rows: at most CUBLAS_ROWS rows,
    16-bit, CUDA): the LayerNorm kernel, then torch.addmm, SiLU on u in place / the [u | a | u*LN(a)] concat.
    Forced on here (the predicate is False off a GPU) so its operand order, columns and bias are checked
    against the reference, alone and composed as the model composes them."""
    import importlib

    uvqk_mod, out_mod = (importlib.import_module(f"hstu_opt.ops.{op}.triton") for op in ("uvqk", "hstu_output"))

    taken = []
    for mod in (uvqk_mod, out_mod):
        monkeypatch.setattr(mod, "cublas_rows", lambda t: taken.append(t.shape[0]) or True)
    monkeypatch.setattr(uvqk_mod, "uvqk_triton", None)  # (the Triton GEMMs must not run)
    monkeypatch.setattr(out_mod, "hstu_output_triton", None)
    _check_uvqk(dtype, 37, 50, 2, 16, 24)
    test_hstu_output_matches_reference(dtype, 37, 48, 50)
    test_stu_layer_all_triton_matches_reference(dtype)
    assert len(taken) == 4 and set(taken) == {37, 21}


def test_cublas_rows_only_for_few_16_bit_rows_on_a_gpu(monkeypatch):
    from hstu_opt.ops import _triton

    assert _triton.CUBLAS_ROWS == 0  # (off: no gain in the hit in H100 run 91, ops/_triton.py)
    monkeypatch.setattr(_triton, "CUBLAS_ROWS", 256)
    assert not _triton.cublas_rows(torch.empty(8, 4, dtype=torch.bfloat16))  # a CPU tensor (and the interpreter)
    assert not _triton.cublas_rows(torch.empty(8, 4, dtype=torch.float32, device="meta"))
