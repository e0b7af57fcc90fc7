"""The paged cached attention (cached_hstu_attention_paged): the cache read in place through page tables.

Its reference gathers the pages and runs the contiguous cached reference (the spec); the Triton kernel
reads the pool in place. Both must equal the contiguous cached op on the same rows, for page sizes that
do and do not divide the cache lengths, with contextual rows, a window and min_full_attn_seq_len.
Interpreter: fp32 and fp16 only (its bf16 dot is wrong; bf16 runs in benchmarks/gpu_check.py).
"""

import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: E402,F401 (before the kernels)

from hstu_opt import ops  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from tests.conftest import TOLERANCES  # noqa: E402


def paged_case(cache_len, delta_len, page_rows, H, d, dtype, seed=0):
    """Contiguous cache rows and the same rows scattered over shuffled pages of a zeroed pool (extra pages
    hold other data, so a wrong page read shows)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    Lc, Ld = sum(cache_len), sum(delta_len)
    q, k, v = rnd(Ld, H, d), rnd(Ld, H, d), rnd(Ld, H, d)
    kc, vc = rnd(Lc, H, d), rnd(Lc, H, d)
    n_pages = [-(-c // page_rows) for c in cache_len]
    P = sum(n_pages) + 3
    perm = torch.randperm(P, generator=g)
    k_pages, v_pages = rnd(P, page_rows, H, d), rnd(P, page_rows, H, d)  # junk everywhere, then the users' rows
    table = torch.zeros(len(cache_len), max(n_pages), dtype=torch.int32)
    start, used = 0, 0
    for b, (c, n) in enumerate(zip(cache_len, n_pages)):
        for j in range(n):
            p, rows = int(perm[used]), min(page_rows, c - j * page_rows)
            k_pages[p, :rows], v_pages[p, :rows] = kc[start:start + rows], vc[start:start + rows]
            table[b, j] = p
            start, used = start + rows, used + 1
    co = torch.tensor([0, *torch.tensor(cache_len).cumsum(0).tolist()])
    do = torch.tensor([0, *torch.tensor(delta_len).cumsum(0).tolist()])
    lens = torch.tensor(cache_len, dtype=torch.int64)
    return (q, k, v, do, kc, vc, co), (q, k, v, do, k_pages, v_pages, table, lens)


MASKS = [dict(contextual_len=0, max_attn_len=0), dict(contextual_len=2, max_attn_len=0),
         dict(contextual_len=1, max_attn_len=5), dict(contextual_len=2, max_attn_len=7, min_full_attn_seq_len=3)]


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("page_rows", [64, 128])
def test_paged_reference_equals_contiguous(mask, page_rows):
    contiguous, paged = paged_case([130, 5, 64], [3, 1, 7], page_rows, 2, 16, torch.float32)
    kw = dict(max_seq_len=300, alpha=0.3, max_delta_len=8, **mask)
    want = ops.cached_hstu_attention(*contiguous, **kw)
    torch.testing.assert_close(ops.cached_hstu_attention_paged(*paged, **kw), want, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("cache_len,page_rows", [
    ([130, 5, 64], 64),  # 130 and 5 do not divide by the page, 64 does
    ([128, 3, 300], 128),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_triton_equals_contiguous(mask, cache_len, page_rows, dtype):
    contiguous, paged = paged_case(cache_len, [3, 1, 7], page_rows, 2, 16, dtype, seed=len(cache_len) + page_rows)
    kw = dict(max_seq_len=400, alpha=0.3, max_delta_len=8, **mask)
    want = ops.cached_hstu_attention(*contiguous, impl=Impl.TRITON, **kw)
    got = ops.cached_hstu_attention_paged(*paged, impl=Impl.TRITON, **kw)
    if dtype == torch.float32:  # the same kernel on the same rows: the bar is 1e-6
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    ref = ops.cached_hstu_attention(*(a.float() if a.is_floating_point() else a for a in contiguous), **kw)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=rtol)


@needs_triton
def test_paged_triton_key_splits():
    """Several key splits per user (long max_seq_len, few programs): partials summed, pages crossed."""
    from hstu_opt.ops.hstu_attention.triton import cache_splits

    assert cache_splits(2000, 2 * 2, 32)[0] > 1
    contiguous, paged = paged_case([600, 70], [2, 1], 64, 2, 16, torch.float32, seed=3)
    kw = dict(max_seq_len=2000, alpha=0.3, max_delta_len=2, contextual_len=2)
    want = ops.cached_hstu_attention(*contiguous, **kw)
    got = ops.cached_hstu_attention_paged(*paged, impl=Impl.TRITON, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@needs_triton
def test_unchecked_page_size_runs_the_reference(monkeypatch):
    from hstu_opt.ops.hstu_attention import triton as tri

    def boom(*a, **k):
        raise AssertionError("an unchecked page size reached the kernel")

    monkeypatch.setattr(tri, "launch_cached", boom)
    contiguous, paged = paged_case([50, 9], [2, 1], 48, 1, 16, torch.float32)
    kw = dict(max_seq_len=100, alpha=0.3, max_delta_len=2)
    with pytest.warns(UserWarning, match="pages of 48 rows"):
        got = ops.cached_hstu_attention_paged(*paged, impl=Impl.TRITON, **kw)
    torch.testing.assert_close(got, ops.cached_hstu_attention(*contiguous, **kw), atol=0, rtol=0)


@needs_triton
def test_paged_real_and_fake_signatures_agree():
    import inspect

    from hstu_opt.ops.hstu_attention import triton as tri

    real = [a.name for a in torch.ops.hstu_opt.cached_hstu_attention_paged_triton.default._schema.arguments]
    assert real == list(inspect.signature(tri.cached_hstu_attention_paged_triton._abstract_fn).parameters)


@needs_triton
@pytest.mark.parametrize("paged_ws", [True, False])
def test_paged_ws_switch_sends_gluon_launches_only_when_on(monkeypatch, paged_ws):
    """triton.PAGED_WS (on since H200 runs 72/76): a paged launch the Gluon kernel would take (here: forced)
    goes to its paged form when on, and runs the Triton kernel's PAGE mode (same result) when off."""
    from hstu_opt.ops.hstu_attention import gluon_ws
    from hstu_opt.ops.hstu_attention import triton as tri

    calls = []

    def gluon(*a, **k):  # (no Gluon on a CPU: record the call, fill the output from the Triton kernel)
        calls.append(a)
        raise _Routed

    assert tri.PAGED_WS  # the shipped setting
    monkeypatch.setattr(tri, "PAGED_WS", paged_ws)
    monkeypatch.setattr(tri, "takes_cached_ws", lambda *a, **k: True)
    monkeypatch.setattr(gluon_ws, "launch_cached_paged_ws", gluon)
    contiguous, paged = paged_case([70, 9], [2, 1], 64, 1, 16, torch.float32)
    kw = dict(max_seq_len=100, alpha=0.3, max_delta_len=2)
    if paged_ws:
        with pytest.raises(_Routed):
            ops.cached_hstu_attention_paged(*paged, impl=Impl.TRITON, **kw)
        assert len(calls) == 1
        return
    got = ops.cached_hstu_attention_paged(*paged, impl=Impl.TRITON, **kw)
    assert not calls
    torch.testing.assert_close(got, ops.cached_hstu_attention(*contiguous, **kw), atol=1e-6, rtol=1e-6)


@needs_triton
def test_paged_pool_is_checked_as_the_row_matrix_the_kernels_read(monkeypatch):
    """The Gluon route's checks (tma_ok's strides) see a pool layer as [pages * page_rows, H, d], as the
    kernels read it, not the 4-D [pages, page_rows, H, d] view (which never passed them)."""
    from hstu_opt.ops.hstu_attention import gluon_ws
    from hstu_opt.ops.hstu_attention import triton as tri

    seen = []
    monkeypatch.setattr(tri, "_gluon_takes", lambda q, *others: seen.append([t.dim() for t in others]) or False)
    monkeypatch.setattr(tri, "FWD_FLAGS", {**tri.FWD_FLAGS, "WS": True})
    monkeypatch.setattr(gluon_ws, "launch_cached_paged_ws", None)
    contiguous, paged = paged_case([70, 9], [2, 1], 64, 1, 16, torch.float32)
    kw = dict(max_seq_len=100, alpha=0.3, max_delta_len=2)
    ops.cached_hstu_attention_paged(*paged, impl=Impl.TRITON, **kw)
    assert seen and all(dims == [3, 3, 3, 3] for dims in seen), seen


class _Routed(Exception):
    """Raised by the stand-in Gluon launch: the router sent the call there."""
