"""The plugin's kernel (the source compile.py turns into cubins) in Triton's interpreter against the float64
oracle of tests/ops/oracle.py (HSTU.md's pseudo-code), on the padded layout with NaN in every padding
slot: every mask option (targets, contextual rows, window, min_full), odd lengths, head dims 32/50/64/128,
fp32 and fp16 (the interpreter's bf16 dot is wrong: bf16 runs on the H200, benchmarks/gpu_plugin.py)."""

import itertools

import numpy as np
import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: F401 (before the kernels)

from plugins.hstu_attention import spec  # noqa: E402
from tests.conftest import TOLERANCES  # noqa: E402
from tests.ops import oracle  # noqa: E402

pytestmark = needs_triton


def padded_case(hl, nc, C, H, d, dtype, seed, nh=None, ncw=None):
    """Random padded q/k/v [B, n, H, d] (NaN in padding slots), the lengths, and the oracle's answer."""
    g = torch.Generator().manual_seed(seed)
    B = len(hl)
    nh = nh or max(hl)
    ncw = max(nc) if ncw is None else ncw
    n = C + nh + ncw
    q, k, v = (torch.full((B, n, H, d), float("nan"), dtype=torch.float64) for _ in range(3))
    rows = []
    for b in range(B):
        r = list(range(C + hl[b])) + list(range(C + nh, C + nh + nc[b]))
        rows.append(r)
        for t in (q, k, v):
            t[b, r] = torch.randn(len(r), H, d, generator=g, dtype=torch.float64)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return q, k, v, rows, n


def run_oracle(q, k, v, rows, nc, attrs):
    jag = [torch.cat([t[b, r] for b, r in enumerate(rows)]) for t in (q, k, v)]
    offsets = np.r_[0, np.cumsum([len(r) for r in rows])]
    out = oracle.attention(*jag, offsets, torch.tensor(nc) if attrs.has_targets else None, attrs.max_seq_len,
                           attrs.alpha, attrs.contextual_len, attrs.max_attn_len, attrs.min_full_attn_seq_len)
    want = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    for b, r in enumerate(rows):
        want[b, r] = out[offsets[b]:offsets[b + 1]]
    return want


def check(hl, nc, C, window, full, d, dtype, seed=0, H=2, length_dtype=torch.int64, has_targets=1):
    q, k, v, rows, n = padded_case(hl, nc, C, H, d, dtype, seed)
    attrs = spec.Attributes(alpha=d ** -0.5, max_seq_len=n + 7, contextual_len=C, max_attn_len=window,
                            min_full_attn_seq_len=full, has_targets=has_targets)
    from plugins.hstu_attention import kernel

    out = torch.full(q.shape[:3] + (v.shape[-1],), float("nan"), dtype=dtype)
    kernel.launch(q, k, v, out, torch.tensor(hl, dtype=length_dtype), torch.tensor(nc, dtype=length_dtype),
                  torch.tensor([n - C - max(nc)], dtype=length_dtype), attrs, interpret=True)
    want = run_oracle(q, k, v, rows, nc, attrs)
    atol, rtol = TOLERANCES[dtype]
    scale = want.abs().max().item()
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, atol=atol * max(scale, 1e-3), rtol=rtol)


COMBOS = list(itertools.product([0, 3], [0, 4, 40], [0, 3]))  # C, window, min_full


@pytest.mark.parametrize("C,window,full", COMBOS, ids=[f"C{c}-W{w}-full{f}" for c, w, f in COMBOS])
def test_mask_options_fp32(C, window, full):
    """Odd lengths, one user longer than a 64-row block, candidates 0..5 per user."""
    check(hl=[70, 5, 1], nc=[3, 0, 5], C=C, window=window, full=full, d=32, dtype=torch.float32, seed=C + window)


@pytest.mark.parametrize("d", [32, 50, 64, 128])
def test_head_dims_fp16(d):
    check(hl=[37, 9], nc=[4, 1], C=2, window=0, full=0, d=d, dtype=torch.float16, seed=d)


def test_fp16_window_int32_lengths():
    check(hl=[66, 3], nc=[2, 6], C=1, window=5, full=2, d=64, dtype=torch.float16, length_dtype=torch.int32)


def test_without_targets():
    """The retrieval graph's node: no candidate slots, has_targets 0."""
    check(hl=[20, 7], nc=[0, 0], C=2, window=0, full=0, d=32, dtype=torch.float32, has_targets=0)
