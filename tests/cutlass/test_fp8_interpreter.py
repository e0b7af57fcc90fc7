"""The FP8 projections' quantizing LayerNorm pass (ops/_fp8.py) in Triton's CPU interpreter."""

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: F401 (first)

import pytest  # noqa: E402
import torch  # noqa: E402

from hstu_opt.ops import _fp8  # noqa: E402

pytestmark = needs_triton


@pytest.mark.parametrize("gated,gather", [(False, False), (False, True), (True, False)])
def test_quantizing_ln_pass_in_the_interpreter(gated, gather):
    """The Triton pass's indexing, masking, gather, gate and row absmax, in Triton's interpreter with an
    fp32 output (the interpreter's fp32 -> e4m3 cast is not the hardware's: codes are checked on the
    H200). Tolerances: the interpreter's bf16 rounding differs from torch's by up to an ulp (~0.8%)."""
    import triton

    _, kernel = _fp8._triton()
    g = torch.Generator().manual_seed(0)
    M, K = 37, 96
    x = (torch.randn(M, K, generator=g) * 3).bfloat16()
    nw, nb = torch.rand(K, generator=g) + 0.5, torch.randn(K, generator=g) * 0.1
    u = torch.randn(M, 4 * K, generator=g).bfloat16()[:, :K] if gated else None  # a strided view, as in the model
    rows = torch.tensor([3, 1, 36, 1, 0]) if gather else None
    R = M if rows is None else len(rows)
    q, s = torch.empty(R, 3 * K if gated else K), torch.empty(R)
    src = u if gated else x
    kernel[(triton.cdiv(R, 16),)](x, nw, nb, src, rows if gather else x, q, s, R, K, x.stride(0), src.stride(0),
                                  q.stride(0), 1e-6, GATE=gated, GATHER=gather, ROWS=16, BLOCK_K=128, num_warps=4)
    xx = x if rows is None else x.index_select(0, rows)
    y = (_fp8.gated_rows(u, xx, nw, nb, 1e-6) if gated else
         torch.nn.functional.layer_norm(xx.float(), (K,), nw, nb, 1e-6).bfloat16()).float()
    want_s = y.abs().amax(dim=1) / 448
    assert torch.allclose(s, want_s, rtol=0.02)
    assert (q - y / s[:, None]).abs().max() < 448 * 0.02 and q.abs().max() <= 448
