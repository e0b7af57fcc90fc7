import math

import pytest
import torch

from hstu_opt import ops
from hstu_opt.ops import Impl
from tests.conftest import TOLERANCES, random_jagged
from tests.ops import oracle

CASES = [
    # (lengths, num_targets, contextual_len, max_attn_len)
    ([1], [0], 0, 0),
    ([1, 7, 13], [0, 0, 0], 0, 0),
    ([5, 9, 1, 16], [2, 3, 1, 0], 0, 0),  # targets; a length-1 sequence that is one target
    ([11, 6, 9], [3, 1, 4], 2, 0),  # contextual rows + targets
    ([17, 12, 23], [2, 0, 5], 0, 4),  # local window
    ([14, 19], [3, 2], 3, 5),  # everything together
    ([129, 3], [7, 1], 1, 0),  # a longer sequence next to a short one
]


@pytest.mark.parametrize("lengths,num_targets,C,window", CASES)
@pytest.mark.parametrize("H,dqk,dv", [(1, 8, 8), (2, 50, 50), (3, 16, 24)])
def test_reference_matches_float64_loop(lengths, num_targets, C, window, H, dqk, dv):
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, H, dqk, dv, seed=len(lengths) + H)
    N, alpha = max(lengths) + 3, 1 / math.sqrt(dqk)
    got = ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=N, alpha=alpha, contextual_len=C, max_attn_len=window)
    want = oracle.attention(q, k, v, offsets, nt, N, alpha, C, window)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision(dtype):
    lengths, num_targets = [5, 9, 1, 16], [2, 3, 1, 0]
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, 2, 32, 32, dtype=dtype, seed=3)
    got = ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=20, alpha=0.2)
    assert got.dtype == dtype
    want = oracle.attention(q, k, v, offsets, nt, 20, 0.2)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


def test_targets_do_not_see_each_other():
    # Changing one target's k/v must not change any other target's output.
    q, k, v, offsets, nt = random_jagged([10], [4], 2, 8, 8, seed=1)
    base = ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=10, alpha=0.3)
    k2, v2 = k.clone(), v.clone()
    k2[7] += 5.0
    v2[7] += 5.0
    moved = ops.hstu_attention(q, k2, v2, offsets, nt, max_seq_len=10, alpha=0.3)
    torch.testing.assert_close(moved[[6, 8, 9]], base[[6, 8, 9]])
    torch.testing.assert_close(moved[:6], base[:6])
    assert not torch.allclose(moved[7], base[7])


@pytest.mark.parametrize("C,window", [(0, 0), (2, 0), (0, 3), (1, 4)])
def test_cached_equals_target_rows_of_full(C, window):
    cache_len, delta_len = [9, 1 + C, 17], [3, 1, 5]
    H, d = 2, 16
    full_len = [c + d_ for c, d_ in zip(cache_len, delta_len)]
    q, k, v, offsets, nt = random_jagged(full_len, delta_len, H, d, d, seed=11)
    full = ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=30, alpha=0.25, contextual_len=C, max_attn_len=window)
    cache_rows = torch.cat([torch.arange(int(offsets[b]), int(offsets[b]) + cache_len[b]) for b in range(3)])
    delta_rows = torch.cat([torch.arange(int(offsets[b]) + cache_len[b], int(offsets[b + 1])) for b in range(3)])
    cache_offsets = torch.tensor([0, *torch.tensor(cache_len).cumsum(0).tolist()])
    delta_offsets = torch.tensor([0, *torch.tensor(delta_len).cumsum(0).tolist()])
    got = ops.cached_hstu_attention(q[delta_rows], k[delta_rows], v[delta_rows], delta_offsets, k[cache_rows],
                                    v[cache_rows], cache_offsets, max_seq_len=30, alpha=0.25, contextual_len=C,
                                    max_attn_len=window)
    torch.testing.assert_close(got, full[delta_rows])


def test_batched_equals_each_user_alone():
    lengths, num_targets = [6, 13, 2], [1, 4, 0]
    q, k, v, offsets, nt = random_jagged(lengths, num_targets, 2, 8, 8, seed=5)
    batched = ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=32, alpha=0.3, contextual_len=1)
    for b in range(3):
        s, e = int(offsets[b]), int(offsets[b + 1])
        alone = ops.hstu_attention(q[s:e], k[s:e], v[s:e], torch.tensor([0, e - s]), nt[b : b + 1], max_seq_len=32,
                                   alpha=0.3, contextual_len=1)
        torch.testing.assert_close(batched[s:e], alone)


def test_missing_triton_names_the_extra(monkeypatch):
    import sys

    from hstu_opt.errors import BackendUnavailable

    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "hstu_opt.ops.hstu_attention.triton", raising=False)
    from hstu_opt.ops.hstu_attention import TABLE

    monkeypatch.setattr(TABLE, "_impls", {k: v for k, v in TABLE._impls.items() if k[0] != Impl.TRITON})
    q, k, v, offsets, nt = random_jagged([3], [0], 1, 4, 4)
    with pytest.raises(BackendUnavailable, match="pip install 'hstu-opt\\[triton\\]'"):
        ops.hstu_attention(q, k, v, offsets, nt, max_seq_len=3, alpha=1.0, impl=Impl.TRITON)


def test_op_without_that_implementation_runs_its_reference():
    x = torch.randn(4, 8)
    w, b = torch.ones(8), torch.zeros(8)
    torch.testing.assert_close(ops.layer_norm(x, w, b, impl=Impl.CUTLASS), ops.layer_norm(x, w, b))
