"""HSTU.md "The mask" through every implementation, against the float64 pseudo-code of tests/ops/oracle.py.

Random jagged batches over every combination of {targets none / some} x {contextual rows 0 / 2} x
{window off / small / large} x {min_full_attn_seq_len 0 / some}: the reference ops (jagged, the padded
mask the ONNX export carries, cached), and the Triton kernels in Triton's CPU interpreter (full with
pointer and TMA loads, key splits, cached with pointer and TMA loads; fp32 and fp16: the interpreter
computes bf16 dots wrongly, bf16 is swept on the GPU by benchmarks/gpu_hstu.py).
"""

import itertools
import math

import numpy as np
import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: F401 (before the kernels)

from hstu_opt import ops  # noqa: E402
from hstu_opt.model import HstuConfig  # noqa: E402
from hstu_opt.model.layout import Padded  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from tests.conftest import TOLERANCES  # noqa: E402
from tests.ops import oracle  # noqa: E402

COMBOS = list(itertools.product([False, True], [0, 2], [0, 3, 20], [0, 5]))  # targets, C, window, min_full
IDS = [f"targets{int(t)}-C{c}-W{w}-full{f}" for t, c, w, f in COMBOS]


def batch(targets: bool, C: int, seed: int, H: int = 2, d: int = 16, dtype=torch.float32, long: int = 90):
    """Four users (one longer than a 64-row block), with or without targets; q/k/v [L, H, d]."""
    rng = np.random.default_rng(seed)
    nt = rng.integers(1, 6, size=4) if targets else np.zeros(4, np.int64)
    lengths = np.maximum(rng.integers(C + 1, 40, size=4), C + nt + 1)
    lengths[1] = max(long, lengths[1])
    g = torch.Generator().manual_seed(seed)
    L = int(lengths.sum())
    q, k, v = (torch.randn(L, H, d, generator=g).to(dtype) for _ in range(3))
    offsets = torch.tensor(np.r_[0, np.cumsum(lengths)], dtype=torch.int64)
    return q, k, v, offsets, torch.tensor(nt, dtype=torch.int64)


def kw(C, window, full, N):
    return dict(max_seq_len=N, alpha=16 ** -0.5, contextual_len=C, max_attn_len=window, min_full_attn_seq_len=full)


def split_cache(offsets, nt):
    """Row indices and offsets of each user's [contextual][history] (the cache) and its targets (new rows)."""
    lengths = (offsets[1:] - offsets[:-1]).tolist()
    c_len = [n - int(t) for n, t in zip(lengths, nt)]
    rows_c = torch.cat([torch.arange(int(offsets[b]), int(offsets[b]) + c_len[b]) for b in range(len(c_len))])
    rows_d = torch.cat([torch.arange(int(offsets[b]) + c_len[b], int(offsets[b + 1])) for b in range(len(c_len))])
    co = torch.tensor(np.r_[0, np.cumsum(c_len)], dtype=torch.int64)
    do = torch.tensor(np.r_[0, np.cumsum(nt.numpy())], dtype=torch.int64)
    return rows_c, rows_d, co, do


def test_oracle_reads_the_spec_examples():
    """Spot values of the pseudo-code itself: with a window the contextual columns are not exempt, and
    min_full_attn_seq_len restores full causal attention for the last rows and the targets."""
    n, T, C, W = 12, 2, 2, 3  # rows: 0-1 contextual (id 0), 2-9 history (ids 1-8), 10-11 targets (id hi = 9)
    assert oracle.mask_ij(5, 0, n, T, C, 0)  # no window: history sees contextual
    assert not oracle.mask_ij(5, 0, n, T, C, W)  # id 4 is 4 ids after the contextual rows: out of a 3-window
    assert oracle.mask_ij(4, 0, n, T, C, W)  # id 3: inside
    assert oracle.mask_ij(0, 9, n, T, C, W) and not oracle.mask_ij(0, 10, n, T, C, W)  # contextual sees history
    assert not oracle.mask_ij(10, 2, n, T, C, W)  # a target (id 9) vs id 1: outside the window
    assert oracle.mask_ij(10, 2, n, T, C, W, 1)  # min_full > 0: the targets see everything earlier
    assert oracle.mask_ij(9, 0, n, T, C, W, 1)  # id 8 >= hi - 1: full attention
    assert not oracle.mask_ij(8, 0, n, T, C, W, 1)  # id 7 < hi - 1: windowed
    assert not oracle.mask_ij(10, 11, n, T, C, W, 5) and oracle.mask_ij(11, 11, n, T, C, W)  # targets: only themselves


@pytest.mark.parametrize("targets,C,window,full", COMBOS, ids=IDS)
def test_padded_mask_equals_pseudo_code(targets, C, window, full):
    """The [B, n, n] mask the padded engine contract (and so the ONNX export and the fused node's input)
    is built from: layout.Padded, element for element."""
    rng = np.random.default_rng(7 + C + window)
    B, Nh, Nc = 3, 30, 5
    hl = torch.tensor(rng.integers(1, Nh + 1, size=B))
    nc = torch.tensor(rng.integers(1, Nc + 1, size=B) if targets else np.zeros(B, np.int64))
    cfg = HstuConfig(embedding_dim=8, num_layers=1, num_heads=1, attention_dim=4, linear_dim=4, max_history_len=Nh,
                     max_targets=Nc, num_items=10, contextual_len=C, max_attn_len=window, min_full_attn_seq_len=full)
    layout = Padded(hl, nc, Nh, Nc, cfg)
    for b in range(B):
        slots = torch.cat([torch.arange(C), C + torch.arange(int(hl[b])), C + Nh + torch.arange(int(nc[b]))])
        n = len(slots)
        want = oracle.user_mask(n, int(nc[b]), C, window, full)
        assert torch.equal(layout.mask[b][slots][:, slots], want)
        assert not layout.mask[b].flatten()[~layout.valid[b][:, None].expand(-1, layout.valid.shape[1]).flatten()].any()


@pytest.mark.parametrize("targets,C,window,full", COMBOS, ids=IDS)
def test_reference_ops_equal_pseudo_code(targets, C, window, full):
    """Reference jagged attention in float64, and its cached form against the target rows."""
    q, k, v, offsets, nt = batch(targets, C, seed=11 + C + window + full)
    N = int((offsets[1:] - offsets[:-1]).max()) + 3
    want = oracle.attention(q, k, v, offsets, nt, N, 16 ** -0.5, C, window, full)
    got = ops.hstu_attention(q.double(), k.double(), v.double(), offsets, nt, **kw(C, window, full, N))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    if targets:
        rows_c, rows_d, co, do = split_cache(offsets, nt)
        cached = ops.cached_hstu_attention(q[rows_d].double(), k[rows_d].double(), v[rows_d].double(), do,
                                           k[rows_c].double(), v[rows_c].double(), co, **kw(C, window, full, N))
        torch.testing.assert_close(cached, want[rows_d], atol=1e-12, rtol=1e-10)


@needs_triton
@pytest.mark.parametrize("targets,C,window,full", COMBOS, ids=IDS)
@pytest.mark.parametrize("dtype,loads", [(torch.float32, "pointers"), (torch.float16, "pointers"),
                                         (torch.float16, "tma")])
def test_triton_full_equals_pseudo_code(targets, C, window, full, dtype, loads):
    """The full kernel (NaN-poisoned output), and with its keys in 2 splits (float32 partials, summed)."""
    from hstu_opt.ops.hstu_attention.triton import attention_fwd, launch_fwd

    q, k, v, offsets, nt = batch(targets, C, seed=3 + C + window + full, dtype=dtype)
    N = int((offsets[1:] - offsets[:-1]).max()) + 3
    want = oracle.attention(q, k, v, offsets, nt, N, 16 ** -0.5, C, window, full)
    atol, rtol = TOLERANCES[dtype]
    out = torch.full_like(v, float("nan"))
    launch_fwd(q, k, v, offsets, nt, out, N, 16 ** -0.5, C, window, config={"TMA": loads == "tma"},
               min_full_attn_seq_len=full)
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    if dtype == torch.float32:
        split = attention_fwd(q, k, v, offsets, nt, N, 16 ** -0.5, C, window, splits=2, min_full_attn_seq_len=full)
        torch.testing.assert_close(split.double(), want, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("targets,C,window,full", [c for c in COMBOS if c[0]], ids=[i for i, c in zip(IDS, COMBOS) if c[0]])
@pytest.mark.parametrize("dtype,tma", [(torch.float32, False), (torch.float16, False), (torch.float16, True)])
def test_triton_cached_equals_pseudo_code(targets, C, window, full, dtype, tma):
    """Cached scoring (new rows = the targets, against the cache of [contextual][history]): the target
    rows of the full forward, for the op's key splits and NaN-poisoned partials."""
    from hstu_opt.ops.hstu_attention.triton import cached_partials_shape, launch_cached

    q, k, v, offsets, nt = batch(targets, C, seed=5 + C + window + full, dtype=dtype)
    N = int((offsets[1:] - offsets[:-1]).max()) + 3
    want = oracle.attention(q, k, v, offsets, nt, N, 16 ** -0.5, C, window, full)
    rows_c, rows_d, co, do = split_cache(offsets, nt)
    qd = q[rows_d]
    shape = cached_partials_shape(qd, v, do, N, int(nt.max()))
    parts = torch.full(shape, float("nan"))
    launch_cached(qd, k[rows_d], v[rows_d], do, k[rows_c], v[rows_c], co, parts, N, 16 ** -0.5, C, window,
                  int(nt.max()), tma=tma, min_full_attn_seq_len=full)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(parts.sum(0).double(), want[rows_d], atol=atol, rtol=rtol)
    op = ops.cached_hstu_attention(qd, k[rows_d], v[rows_d], do, k[rows_c], v[rows_c], co, **kw(C, window, full, N),
                                   max_delta_len=int(nt.max()), impl=Impl.TRITON)
    torch.testing.assert_close(op.double(), want[rows_d], atol=atol, rtol=rtol)


def test_window_changes_what_a_candidate_sees():
    """Cached scoring under a window is not the unwindowed result: the check above has teeth."""
    q, k, v, offsets, nt = batch(True, 2, seed=1)
    N = int((offsets[1:] - offsets[:-1]).max())
    rows_c, rows_d, co, do = split_cache(offsets, nt)
    args = (q[rows_d], k[rows_d], v[rows_d], do, k[rows_c], v[rows_c], co)
    windowed = ops.cached_hstu_attention(*args, **kw(2, 3, 0, N))
    full = ops.cached_hstu_attention(*args, **kw(2, 0, 0, N))
    assert not torch.allclose(windowed, full)
    assert math.isfinite(float(windowed.abs().max()))
