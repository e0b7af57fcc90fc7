"""Triton attention kernels against the reference op, in Triton's CPU interpreter (TRITON_INTERPRET=1).

fp32 and fp16 only: the interpreter computes bf16 tl.dot wrongly (triton-lang/triton#11584); bf16 is
checked on the GPU by scripts/gpu_check.py. Tolerances come from the shared per-dtype table.
"""


import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: E402,F401 (before the kernels)

pytestmark = needs_triton

from hstu_opt import ops  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from tests.conftest import TOLERANCES, random_jagged  # noqa: E402

CASES = [
    # lengths, num_targets, contextual_len, max_attn_len
    ([1], [0], 0, 0),
    ([1, 7, 70], [1, 2, 5], 0, 0),  # a length-1 target-only sequence; a sequence over one block
    ([13, 5, 33], [3, 0, 4], 2, 0),  # contextual rows
    ([40, 9], [2, 1], 0, 6),  # window
    ([150, 5, 17], [7, 1, 2], 3, 9),  # long next to short, everything on
    ([200, 90, 75], [7, 2, 0], 70, 0),  # contextual rows in two query blocks, history past both
]


@pytest.fixture(params=["tma", "pointers"])
def loads(request, monkeypatch):
    """Both ways the kernel reads q/k/v: TMA descriptors (real launches of 16-bit power-of-two heads) and
    masked pointer loads (every other launch, and every traced one: what the compiled engine runs)."""
    from hstu_opt.ops.hstu_attention import triton as tri

    monkeypatch.setitem(tri.FWD_FLAGS, "TMA", request.param == "tma")
    return request.param


@pytest.mark.parametrize("lengths,num_targets,C,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H,dqk,dv", [(2, 16, 16), (1, 50, 50), (3, 32, 64)])
def test_triton_matches_reference(lengths, num_targets, C, window, dtype, H, dqk, dv):
    """Default choice of loads: TMA for fp16 d=16, pointers for fp32 and the odd head dims."""
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, H, dqk, dv, dtype=dtype, seed=sum(lengths) + H)
    N = max(lengths) + 5
    kw = dict(max_seq_len=N, alpha=dqk ** -0.5, contextual_len=C, max_attn_len=window)
    want = ops.hstu_attention(q.float(), k.float(), v.float(), offsets, nt, **kw)
    got = ops.hstu_attention(q, k, v, offsets, nt, impl=Impl.TRITON, **kw)
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("lengths,num_targets,C,window", CASES)
def test_pointer_kernel_on_tma_eligible_heads(lengths, num_targets, C, window, monkeypatch):
    """The compiled engine's path: 16-bit power-of-two heads read through pointers (traced launches)."""
    from hstu_opt.ops.hstu_attention import triton as tri

    monkeypatch.setitem(tri.FWD_FLAGS, "TMA", False)
    test_triton_matches_reference(lengths, num_targets, C, window, torch.float16, 2, 16, 16)


@pytest.mark.parametrize("lengths,num_targets,C,window", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("post_scale", [False, True], ids=["per-score", "post-scale"])
def test_scale_placement_matches_reference(lengths, num_targets, C, window, dtype, post_scale, loads):
    """1/N applied to every score or once to the accumulator (POST_SCALE, forced either way here; by
    default on except in fp16), NaN-poisoned output."""
    from hstu_opt.ops.hstu_attention.triton import launch_fwd

    H, d = 2, 32
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, H, d, d, dtype=dtype, seed=len(lengths) + 3 * C)
    N = max(lengths) + 5
    want = ops.hstu_attention(q.float(), k.float(), v.float(), offsets, nt, max_seq_len=N, alpha=d ** -0.5,
                              contextual_len=C, max_attn_len=window)
    out = torch.full_like(v, float("nan"))
    launch_fwd(q, k, v, offsets, nt, out, N, d ** -0.5, C, window, config={"POST_SCALE": post_scale})
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("lengths,num_targets,C,window", CASES)
@pytest.mark.parametrize("flags", [{"CTX_FIRST": False}, {"LONGEST_FIRST": False}],
                         ids=["contextual-blocks-last", "natural-order"])
def test_program_orders_match_reference(lengths, num_targets, C, window, flags):
    """The program orders other than the default (longest first, contextual blocks first), fp16 through
    TMA, NaN-poisoned output: every block is computed exactly once whatever the order."""
    from hstu_opt.ops.hstu_attention.triton import launch_fwd

    H, d = 2, 16
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, H, d, d, dtype=torch.float16, seed=len(lengths) + C)
    N = max(lengths) + 5
    want = ops.hstu_attention(q.float(), k.float(), v.float(), offsets, nt, max_seq_len=N, alpha=d ** -0.5,
                              contextual_len=C, max_attn_len=window)
    out = torch.full_like(v, float("nan"))
    launch_fwd(q, k, v, offsets, nt, out, N, d ** -0.5, C, window, config={"TMA": True, **flags})
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out.float(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("lengths,num_targets,C,window", [
    ([150, 5, 17], [7, 1, 2], 3, 0),  # splits that start past a short sequence's end (they store zeros)
    ([150, 3, 130], [20, 0, 4], 2, 9),  # window: every block masked
    ([200], [0], 0, 0),  # one user, history only: the batch-1 case the splits exist for
])
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_key_splits_match_reference(lengths, num_targets, C, window, splits, dtype, loads):
    """The full kernel with its keys split across programs (float32 partials, summed) equals the reference."""
    from hstu_opt.ops.hstu_attention.triton import attention_fwd

    H, d = 2, 32
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, H, d, d, dtype=dtype, seed=splits + len(lengths))
    N = max(lengths) + 3
    kw = dict(max_seq_len=N, alpha=d ** -0.5, contextual_len=C, max_attn_len=window)
    want = ops.hstu_attention(q.float(), k.float(), v.float(), offsets, nt, **kw)
    got = attention_fwd(q, k, v, offsets, nt, **kw, splits=splits)
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("splits,shape", [(2, (5, 3, 7)), (3, (600, 2, 1)), (16, (256, 4, 8))])  # sizes off SUM_BLOCK
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sum_splits_adds_partials_in_split_order_then_casts(splits, shape, dtype):
    """sum_splits (one kernel in place of torch's sum(0) and cast): float32 partials summed in split order,
    bit for bit, then rounded to the output dtype as torch rounds. Not bf16 here: the interpreter truncates
    float32 to bf16 whatever the rounding asked (the GPU rounds to nearest even; gpu_check's key-split and
    cached rows check bf16 sums there against float64)."""
    from hstu_opt.ops.hstu_attention.triton import sum_splits

    g = torch.Generator().manual_seed(splits)
    parts = torch.randn(splits, *shape, generator=g) * torch.logspace(-3, 3, splits)[:, None, None, None]
    want = parts[0].clone()
    for s in range(1, splits):  # (in order: float32 addition is not associative)
        want += parts[s]
    got = sum_splits(parts, dtype)
    assert got.shape == shape and got.dtype == dtype
    assert torch.equal(got, want.to(dtype))
    assert torch.equal(sum_splits(parts[:, :1], dtype), want[:1].to(dtype))  # a strided view of the split dim


def test_tma_only_where_a_tile_is_exactly_one_head():
    from hstu_opt.ops.hstu_attention.triton import tma_ok

    x = torch.empty(10, 2, 16, dtype=torch.float16)
    assert tma_ok(x.dtype, x, x, x)
    assert not tma_ok(torch.float32, *(x.float(),) * 3)  # the checking path keeps exact pointer loads
    for bad in (torch.empty(10, 2, 50, dtype=torch.float16),  # padded tiles would read the next head
                torch.empty(10, 1, 256, dtype=torch.float16),  # wider than one descriptor box
                torch.empty(10, 2, 32, dtype=torch.float16)[:, :, :16],  # heads not adjacent in a row
                torch.empty(10 * 32 + 4, dtype=torch.float16)[4:].view(10, 2, 16)):  # start not 16-byte aligned
        assert not tma_ok(bad.dtype, x, bad, x)


def test_traced_launches_take_the_pointer_kernel():
    """torch.export / torch.compile trace the op with fake tensors: Inductor cannot take the host TMA
    descriptors, so those launches must be built with pointer loads (what the compiled engine runs)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu_opt.ops.hstu_attention.triton import launch_fwd

    seen = {}

    def launcher(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: seen.update(kwargs, q=args[0])
        return Grid()

    with FakeTensorMode():
        q = torch.empty(20, 2, 16, dtype=torch.float16)
        offsets, nt = torch.tensor([0, 20]), torch.tensor([1])
        launch_fwd(q, q, q, offsets, nt, torch.empty_like(q), 20, 0.25, 0, 0, launcher=launcher)
    assert seen["TMA"] is False and seen["MERGED"] is False and isinstance(seen["q"], torch.Tensor)


def test_tma_launches_take_their_own_key_tiles():
    """TMA_TILES (64x32 keys) for launches that read through TMA unless `config` sets BLOCK_N; pointer
    launches keep _blocks' 64x64."""
    from hstu_opt.ops.hstu_attention import triton as tri

    seen = []

    def launcher(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: seen.append((kwargs["TMA"], kwargs["BLOCK_N"], args[8]))
        return Grid()

    q = torch.zeros(130, 2, 16, dtype=torch.float16)
    offsets, nt = torch.tensor([0, 130]), torch.tensor([1])
    for config in (None, {"BLOCK_N": 64}, {"TMA": False}):
        tri.launch_fwd(q, q, q, offsets, nt, torch.empty_like(q), 130, 0.25, 0, 0, launcher=launcher, config=config)
    # (TMA, BLOCK_N, split_len): one split covers every key, in whole key tiles
    assert seen == [(True, tri.TMA_TILES["BLOCK_N"], 160), (True, 64, 192), (False, 64, 192)]


def test_key_splits_only_where_the_launch_is_small():
    from hstu_opt.ops.hstu_attention.triton import fwd_splits

    assert fwd_splits(1 * 4, 4352, 64, 64) == 2  # dlrm-v3 at batch 1: 272 programs, the longest 68 blocks
    assert fwd_splits(16 * 4, 4352, 64, 64) == 1  # batch 16: thousands of programs
    assert fwd_splits(512 * 4, 512, 64, 64) == 1
    assert fwd_splits(1, 100, 64, 64) == 1  # never below 4 key blocks per split


def test_cached_key_splits_fill_the_slots_in_whole_waves():
    from hstu_opt.ops.hstu_attention.triton import SLOTS, cache_splits

    assert cache_splits(4352, 4 * 16 * 4, 64)[0] == 1  # dlrm-v3 batch 16 scoring: 256 programs fill one wave
    assert cache_splits(4352, 4 * 1 * 4, 64)[0] == SLOTS // 16  # batch 1: 16 programs
    assert cache_splits(4352, 100, 64)[0] == 2  # 200 programs in one wave, not 300 in two
    assert cache_splits(300, 1, 64) == (2, 192)  # never below 4 key blocks per split


@pytest.mark.parametrize("C,window,N,cache_len", [
    (0, 0, 100, [9, 1, 70]), (2, 0, 100, [9, 3, 70]), (1, 4, 100, [9, 2, 70]),
    (0, 0, 2000, [600, 5, 300]),  # several key splits per user (see triton.cache_splits)
    (2, 7, 2000, [600, 5, 300]),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_triton_matches_reference(C, window, N, cache_len, dtype, loads):
    from hstu_opt.ops.hstu_attention.triton import _blocks, cache_splits

    delta_len = [3, 1, 20]
    H, d = 2, 32
    full = [c + n for c, n in zip(cache_len, delta_len)]
    q, k, v, offsets, nt = random_jagged(full, delta_len, H, d, d, dtype=dtype, seed=7)
    cache_rows = torch.cat([torch.arange(int(offsets[b]), int(offsets[b]) + cache_len[b]) for b in range(3)])
    delta_rows = torch.cat([torch.arange(int(offsets[b]) + cache_len[b], int(offsets[b + 1])) for b in range(3)])
    co = torch.tensor([0, *torch.tensor(cache_len).cumsum(0).tolist()])
    do = torch.tensor([0, *torch.tensor(delta_len).cumsum(0).tolist()])
    kw = dict(max_seq_len=N, alpha=0.2, contextual_len=C, max_attn_len=window, max_delta_len=max(delta_len))
    splits, split_len = cache_splits(N, 3 * H, _blocks(d, d, dtype)["BLOCK_N"])
    if N == 2000:  # partials summed
        assert splits > 1 and split_len < max(cache_len)
    else:  # the kernel writes the result in the inputs' dtype
        assert splits == 1
    args = (q[delta_rows], k[delta_rows], v[delta_rows], do, k[cache_rows], v[cache_rows], co)
    want = ops.cached_hstu_attention(*(a.float() if a.is_floating_point() else a for a in args), **kw)
    got = ops.cached_hstu_attention(*args, impl=Impl.TRITON, **kw)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


def test_real_and_fake_signatures_agree():
    import inspect

    from hstu_opt.ops.hstu_attention import triton as tri

    for op, name in ((tri.hstu_attention_triton, "hstu_attention_triton"),
                     (tri.cached_hstu_attention_triton, "cached_hstu_attention_triton")):
        real = [a.name for a in getattr(torch.ops.hstu_opt, name).default._schema.arguments]
        fake = list(inspect.signature(op._abstract_fn).parameters)
        assert real == fake and len(real) >= 9


def test_fake_op_gives_shapes_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu_opt.ops.hstu_attention.triton import hstu_attention_triton

    with FakeTensorMode():
        q = torch.empty(11, 2, 50)
        v = torch.empty(11, 2, 24)
        out = hstu_attention_triton(q, q, v, torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                                    16, 0.1, 0, 0, 0)
    assert out.shape == (11, 2, 24)


def test_the_gluon_kernel_takes_only_real_hopper_launches_of_few_long_rows():
    """The warp-specialized Gluon kernel (gluon_ws.py, checked on the H200 by benchmarks/ws_probe.py and the
    GPU check script's full/ws rows) runs where it measured faster, and never here: Triton's interpreter,
    CPU tensors, traced launches and explicit configs keep the Triton kernel."""
    from hstu_opt.ops.hstu_attention.triton import takes_cached_ws, takes_ws, ws_wanted

    assert ws_wanted(4352) and ws_wanted(512) and ws_wanted(256)  # (measured faster)
    assert not ws_wanted(200)  # (not measured)
    q = torch.zeros(300, 4, 128, dtype=torch.bfloat16)
    assert not takes_ws(q, q, q, torch.empty_like(q), 4352, 0)
    assert not takes_cached_ws(q, q, q, q, q, torch.empty_like(q)[None], 0, None)


def test_persistent_ctas_take_balanced_work():
    """The Gluon kernel's CTA count: not a multiple of the query blocks per (user, head) where that would give
    some CTAs every longest block (N=512: 4 blocks, 132 SMs), the SM count where that balances best
    (dlrm-v3 batch 16, measured faster on the H200), never more CTAs than items."""
    import math

    from hstu_opt.ops.hstu_attention import gluon_ws

    p = gluon_ws.programs(512 * 4 * 4, 4, 132)
    assert p <= 132 and math.gcd(p, 4) == 1
    assert gluon_ws.programs(16 * 4 * 34, 34, 132, 4) == 132
    assert gluon_ws.programs(100, 4, 132) == 100 and gluon_ws.programs(8192, 4, 132, coprime=False) == 132


@pytest.mark.parametrize("config", [None, {"TMA": False}, {"BLOCK_N": 64}])
def test_launch_passes_the_kernel_only_its_own_arguments(config):
    """Triton's interpreter ignores keyword arguments a kernel does not declare; a GPU launch rejects them
    (a switch of launch_fwd's own once reached the kernel: H200 run 55)."""
    from hstu_opt.ops.hstu_attention import triton as tri

    seen = {}

    def launcher(kernel):
        class Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: seen.update(kwargs)
        return Grid()

    q = torch.zeros(130, 2, 16, dtype=torch.float16)
    tri.launch_fwd(q, q, q, torch.tensor([0, 130]), torch.tensor([1]), torch.empty_like(q), 130, 0.25, 0, 0,
                   launcher=launcher, config=config)
    assert set(seen) - set(tri._hstu_fwd.arg_names) <= {"num_warps", "num_stages", "maxnreg"}


def test_the_gluon_kernel_builds_for_hopper_without_a_gpu(tmp_path):
    """The warp-specialized kernel compiled for sm_90 here (Triton's own ptxas), with and without contextual
    rows and in its cached form (contiguous and paged): it fits shared memory, its consumers run warpgroup MMAs with reallocated registers, and nothing
    spills to local memory. Built in a fresh process without TRITON_INTERPRET: the interpreter's patches
    to Triton's tensor methods, left by this module's interpreted kernels, broke the build in-process."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys; from hstu_opt.ops.hstu_attention import gluon_ws\n"
        "out = {}\n"
        "for c, cached, page in ((0, False, 0), (4, False, 0), (0, True, 0), (0, True, 128)):\n"
        "    k = gluon_ws.compile_sm90(c, cached=cached, page=page)\n"
        "    c = str(c) + ('-cached' if cached else '') + (f'-paged{page}' if page else '')\n"
        "    open(sys.argv[1] + f'/k{c}.cubin', 'wb').write(k.asm['cubin'])\n"
        "    out[c] = {'shared': k.metadata.shared, 'wgmma': 'wgmma.mma_async' in k.asm['ptx'],\n"
        "              'setmaxnreg': 'setmaxnreg' in k.asm['ptx']}\n"
        "print(json.dumps(out))\n")
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    built = json.loads(done.stdout.strip().splitlines()[-1])
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for c, k in built.items():
        assert k["shared"] <= 227 * 1024 and k["wgmma"] and k["setmaxnreg"], (c, k)
        if os.path.exists(tools):
            usage = subprocess.run([tools, "-res-usage", str(tmp_path / f"k{c}.cubin")], capture_output=True,
                                   text=True).stdout
            assert "LOCAL:0" in usage and "STACK:0" in usage, usage


@pytest.mark.parametrize("dqk,dv,dtype", [(24, 40, torch.float32), (8, 8, torch.float16), (512, 512, torch.float32)])
def test_router_runs_the_reference_for_shapes_no_gpu_check_covers(dqk, dv, dtype, monkeypatch):
    """Head dims outside triton.CHECKED_HEAD_DIMS / CHECKED_MIXED_DIMS never reach a kernel: the op warns and
    runs the reference (full and cached)."""
    from hstu_opt.ops.hstu_attention import triton as tri

    def boom(*args, **kwargs):
        raise AssertionError("an unchecked shape reached a Triton kernel")

    monkeypatch.setattr(tri, "attention_fwd", boom)
    monkeypatch.setattr(tri, "launch_cached", boom)
    q, k, v, offsets, nt = random_jagged([9, 4], [2, 1], 1, dqk, dv, dtype=dtype, seed=1)
    kw = dict(max_seq_len=12, alpha=dqk ** -0.5)
    with pytest.warns(UserWarning, match=f"dqk={dqk}, dv={dv}"):
        got = ops.hstu_attention(q, k, v, offsets, nt, impl=Impl.TRITON, **kw)
    torch.testing.assert_close(got, ops.hstu_attention(q, k, v, offsets, nt, **kw))
    delta = torch.tensor([0, 2, 3])
    cache = torch.tensor([0, 7, 10])
    rows_c, rows_d = torch.tensor([*range(7), *range(9, 12)]), torch.tensor([7, 8, 12])
    args = (q[rows_d], k[rows_d], v[rows_d], delta, k[rows_c], v[rows_c], cache)
    got = ops.cached_hstu_attention(*args, impl=Impl.TRITON, **kw)
    torch.testing.assert_close(got, ops.cached_hstu_attention(*args, **kw))


def test_checked_set_is_what_the_gpu_check_sweeps():
    """benchmarks/gpu_check.py sweeps exactly what the router admits: every checked head-dim pair x dtype."""
    import importlib.util
    from pathlib import Path

    from hstu_opt.ops.hstu_attention import triton as tri

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    swept = {(dqk, dv, gpu_check.DTYPES[name]) for dqk, dv, name in gpu_check.sweep_cases()}
    admitted = {(dqk, dv, dt) for dqk in range(1, 300) for dv in range(1, 300) for dt in
                (torch.bfloat16, torch.float16, torch.float32, torch.float64) if tri.checked(dqk, dv, dt)}
    assert swept == admitted
