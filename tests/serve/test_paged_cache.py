"""The paged user cache (serve/kv_cache/paged.py): pool accounting, host-tier round trips, pinning, and
cached scoring through page tables equal to the contiguous path (the model, reference and Triton)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu  # noqa: F401 (first: before any kernel module)

from hstu_opt.model.hstu import PagedKVCache
from hstu_opt.ops import Impl
from hstu_opt.serve.kv_cache import LRUPolicy, PagedKVStore, PageShape, PredictivePolicy, UserKV

SHAPE = PageShape(layers=2, page_rows=4, heads=1, dqk=2, dv=3, dtype=torch.float32)


def user_kv(rows: int, seed: int) -> UserKV:
    g = torch.Generator().manual_seed(seed)
    return UserKV([torch.randn(rows, 1, 2, generator=g) for _ in range(2)],
                  [torch.randn(rows, 1, 3, generator=g) for _ in range(2)])


def same(a: UserKV, b: UserKV) -> bool:
    return all(torch.equal(x, y) for x, y in zip([*a.keys, *a.values], [*b.keys, *b.values]))


def store(device_pages: int, host_pages: int, policy=None) -> PagedKVStore:
    return PagedKVStore(SHAPE, device_pages * SHAPE.page_bytes, host_pages * SHAPE.page_bytes, policy or LRUPolicy())


@pytest.mark.parametrize("policy", [LRUPolicy, PredictivePolicy])
def test_host_tier_round_trip_is_exact_and_pages_never_leak(policy):
    s = store(device_pages=3, host_pages=6, policy=policy())
    kvs = {key: user_kv(rows, seed) for seed, (key, rows) in enumerate([("a", 5), ("b", 4), ("c", 7), ("d", 1)])}
    for key in "abc":
        with s.batch():
            assert same(s.put(key, kvs[key]).gather(), kvs[key])
    # 2 + 1 + 2 pages into a 3-page pool: the policy's victims moved to the host tier, none dropped
    assert s.stats.demotions >= 1 and s.stats.evictions == 0
    assert {s.tier_of(k) for k in "abc"} == {"device", "host"}
    for key in "abcabc":  # every hit (promoting from the host tier when needed) gives the very same rows
        with s.batch():
            assert same(s.get(key).gather(), kvs[key]) and s.tier_of(key) == "device"
    assert s.stats.evictions == 0 and s.stats.promotions >= 2 and s.stats.host_hits == s.stats.promotions
    assert s.stats.hits == 6
    for i in range(12):  # churn: more entries than both tiers hold
        with s.batch():
            s.put(f"x{i}", user_kv(1 + 3 * (i % 4), i))
    st = s.stats
    assert st.evictions > 0
    assert s.pool.free_pages == s.pool.num_pages - st.bytes // SHAPE.page_bytes
    assert s.host.free_pages == s.host.num_pages - st.host_bytes // SHAPE.page_bytes
    assert st.bytes + st.host_bytes == sum(len(e.pages) for e in s._entries.values()) * SHAPE.page_bytes
    s.clear()  # every entry gone: both free lists full again, each page once
    assert sorted(s.pool._free) == list(range(3)) and sorted(s.host._free) == list(range(6))
    assert (s.stats.bytes, s.stats.host_bytes, s.stats.entries, s.stats.host_entries) == (0, 0, 0, 0)


def test_drop_when_host_tier_is_full_or_absent():
    s = store(device_pages=1, host_pages=0)
    with s.batch():
        s.put("a", user_kv(3, 0))
    with s.batch():
        s.put("b", user_kv(3, 1))
    assert "a" not in s and s.stats.evictions == 1 and s.pool.free_pages == 0
    with s.batch():
        assert s.get("a") is None and s.stats.misses == 1
    assert s.put("huge", user_kv(9, 2)) is None and s.stats.too_large == 1


def test_pinned_pages_are_never_evicted_or_overwritten():
    s = store(device_pages=2, host_pages=2)
    a, b = user_kv(8, 0), user_kv(8, 1)
    with s.batch():
        s.put("a", a)
    with s.batch():
        got = s.get("a")  # pinned: the put below finds no unpinned page to take
        assert s.put("b", b) is None and s.stats.no_room == 1
        assert s.tier_of("a") == "device" and same(got.gather(), a)
    with s.batch():  # the batch is over: a may go now
        assert same(s.put("b", b).gather(), b) and s.tier_of("a") == "host"
    with s.batch():  # a host-tier hit needs b's pages, which this batch pins: a miss, nothing moves
        s.get("b")
        assert s.get("a") is None and s.tier_of("a") == "host"


def test_prefetch_promotes_into_free_pages_only():
    now = [0.0]
    policy = PredictivePolicy(clock=lambda: now[0], prefetch_s=10.0)
    for t in range(0, 20, 5):  # users seen before (and gone from the cache) who came back every 5 s
        now[0] = float(t)
        for u in range(20):
            policy.inserted(f"u{u}", 1)
            policy.removed(f"u{u}")
    s = store(device_pages=3, host_pages=2, policy=policy)
    for t, key in ((100.0, "a"), (105.0, "a"), (106.0, "b")):
        now[0] = t
        with s.batch():
            (s.get(key) if key in s else None) or s.put(key, user_kv(8, 0))
    assert s.tier_of("a") == "host"  # b took a's pages
    assert s.prefetch() == 0  # a is likely back within 10 s (as the others were) but needs 2 pages and 1 is free
    with s.batch():
        s.put("b", user_kv(4, 1))  # b shrinks to one page: two free
    assert s.prefetch() == 1 and s.tier_of("a") == "device" and s.stats.prefetches == 1


# ---- cached scoring through page tables -------------------------------------------------------
def paged_cache(model, ids, ratings, ts, offsets, qt, page_rows, pages_first=3):
    """The model's prefill, stored in a page pool (pages handed out in a shuffled order: some unused
    pages come first), as a PagedKVCache."""
    cfg = model.cfg
    kv = model.prefill(ids, ratings, ts, offsets, qt)
    shape = PageShape(cfg.num_layers, page_rows, cfg.num_heads, cfg.attention_dim, cfg.linear_dim, cfg.torch_dtype)
    s = PagedKVStore(shape, 16 * shape.page_bytes)
    s.pool.k.normal_(), s.pool.v.normal_()  # junk where no user's rows are
    s.pool._free.reverse()  # high page ids first: a page table is not the identity
    bounds = offsets.tolist()
    views = [s.put(b, UserKV([k[lo:hi] for k in kv.keys], [v[lo:hi] for v in kv.values]))
             for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]
    table = torch.zeros(len(views), max(len(p.pages) for p in views), dtype=torch.int32)
    for b, p in enumerate(views):
        table[b, :len(p.pages)] = torch.tensor(p.pages)
    return kv, PagedKVCache(s.pool.k, s.pool.v, table, offsets.diff())


def prefill_inputs(C: int, hist: list[int], seed: int = 0):
    g = np.random.default_rng(seed)
    lengths = [C + h for h in hist]
    ids = torch.from_numpy(np.concatenate([np.r_[g.integers(1, 9, C), g.integers(1, 61, h)] for h in hist]))
    ratings = torch.from_numpy(np.concatenate([np.r_[np.zeros(C, np.int64), g.integers(1, 6, h)] for h in hist]))
    ts = torch.from_numpy(np.concatenate([np.sort(g.integers(0, 10**6, C + h)) for h in hist]))
    offsets = torch.tensor(np.r_[0, np.cumsum(lengths)])
    qt = torch.tensor([10**6] * len(hist))
    return ids, ratings, ts, offsets, qt


def model(C: int, window: int, min_full: int = 0):
    from hstu_opt.model import HstuConfig, HstuModel

    torch.manual_seed(0)
    cfg = HstuConfig(embedding_dim=32, num_layers=2, num_heads=2, attention_dim=16, linear_dim=16, max_history_len=80,
                     max_targets=8, num_items=60, contextual_len=C, contextual_cardinality=9, max_attn_len=window,
                     min_full_attn_seq_len=min_full)
    m = HstuModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("C,window,min_full,page_rows", [(0, 0, 0, 64), (2, 0, 0, 64), (2, 5, 3, 128)])
def test_model_scores_paged_equal_contiguous(C, window, min_full, page_rows, monkeypatch):
    """HstuModel.score_cached through page tables == through the contiguous cache (fp32, 1e-6), reference
    and Triton (interpreter): histories of 30 and 40 rows (no page size divides them) and 64 - C (with
    the contextual rows, exactly one 64-row page)."""
    m = model(C, window, min_full)
    inputs = prefill_inputs(C, [30, 64 - C, 40])
    kv, paged = paged_cache(m, *inputs, page_rows)
    cand = torch.tensor([3, 4, 5, 6, 7, 8, 9])
    delta = torch.tensor([0, 2, 3, 7])
    want = m.score_cached(kv, cand, delta)
    torch.testing.assert_close(m.score_cached(paged, cand, delta), want, atol=1e-6, rtol=1e-6)
    pytest.importorskip("triton")
    from hstu_opt.ops.hstu_attention import triton as tri

    launches, launch = [], tri.launch_cached
    monkeypatch.setattr(tri, "launch_cached", lambda *a, **k: launches.append(k["page_table"]) or launch(*a, **k))
    m.impl = {"hstu_attention": "triton"}  # the paged Triton kernel (the other ops: reference)
    torch.testing.assert_close(m.score_cached(paged, cand, delta), want, atol=1e-6, rtol=1e-6)
    assert len(launches) == m.cfg.num_layers and all(t is not None for t in launches)


@pytest.mark.parametrize("P", [3, 4])  # (int32 page ids two to an int64 slot: 3 users x 3 pages leaves half a slot)
@pytest.mark.parametrize("impl", ["reference", "triton", "all_triton"])
def test_graph_staging_pads_without_changing_scores(impl, P):
    """What serve/graphs.py captures for cache hits: every group padded to max_targets candidates and every
    page table to the longest history's pages, jagged offsets fixed at b * max_targets. Run eagerly here
    (no CUDA graph on a CPU): the real rows equal the unpadded paged scoring (fp32, 1e-6); "all_triton":
    every op Triton, the candidate encoder's embedding_rows included."""
    if impl != "reference":
        pytest.importorskip("triton")
    from hstu_opt.serve.graphs import Staged

    m = model(2, 5, 3)
    m.impl = Impl.TRITON if impl == "all_triton" else {"hstu_attention": impl}
    inputs = prefill_inputs(2, [30, 40, 70])
    _, paged = paged_cache(m, *inputs, 64)
    cands = [np.array([3, 4, 5]), np.array([6, 7, 8, 9, 10, 11, 12]), np.array([13])]  # 3, 7 and 1 of max_targets 8
    want = m.score_cached(paged, torch.from_numpy(np.concatenate(cands)), torch.tensor([0, 3, 10, 11]))
    # P: pages for the longest history the model takes (80 rows + 2 contextual at 64 rows a page: 2; more is fine)
    staged = Staged(m, paged.k_pages, paged.v_pages, B=3, T=m.cfg.max_targets, P=P, page_locked=False)
    pages = [paged.page_table[b, :(paged.lengths[b] + 63) // 64].tolist() for b in range(3)]
    staged.stage(pages, paged.lengths.tolist(), cands)
    staged.flat.copy_(staged.host_t)
    got = staged.split(staged.score().numpy(), cands)
    torch.testing.assert_close(torch.from_numpy(np.concatenate(got)), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("C", [0, 2])
@pytest.mark.parametrize("impl", ["reference", "all_triton"])
def test_prefill_buckets_equal_the_unpadded_prefill(C, impl):
    """serve/graphs.PrefillGraphs (what a lone miss replays on a GPU; run eagerly here through the same staged
    buffers): one user's rows padded to a bucket with a padding user give that user's K/V of the unpadded
    prefill (fp32, 1e-6), at lengths on and next to the bucket edges, up to the longest history the model
    takes; its K/V are borrowed (on a GPU, views of buffers the next replay overwrites): UserKV.owned copies them."""
    if impl != "reference":
        pytest.importorskip("triton")
    from hstu_opt.model.layout import row_buckets
    from hstu_opt.serve.graphs import PrefillGraphs

    m = model(C, 5, 3)
    m.impl = Impl.TRITON if impl == "all_triton" else Impl.REFERENCE
    max_rows = C + m.cfg.max_history_len  # 80 history rows (+ C)
    pad = max(1, C)  # the padding user's rows: at least one, and its contextual rows
    assert row_buckets(max_rows, C, m.cfg.max_seq_len, 32) == [32, 64, max_rows + pad]
    graphs = PrefillGraphs(m, max_rows, step=32)
    assert graphs.capture() == 3 and graphs.bucket_for(32 - pad) == 32 and graphs.bucket_for(33 - pad) == 64
    assert graphs.bucket_for(max_rows) == max_rows + pad and graphs.bucket_for(max_rows + 1) is None
    kept = {}
    for hist in (1, 32 - pad - C, 33 - pad - C, 64 - pad - C, m.cfg.max_history_len):
        ids, ratings, ts, offsets, qt = prefill_inputs(C, [hist], seed=hist)
        want = m.prefill(ids, ratings, ts, offsets, qt)
        got = graphs.run(ids.numpy(), ratings.numpy(), ts.numpy(), int(qt[0]))
        assert got.borrowed and got.rows == C + hist
        for a, b in zip([*got.keys, *got.values], [*want.keys, *want.values]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        kept[hist] = (got, got.owned(), want)
    first, copy, want = kept[32 - pad - C]  # (eagerly each run has fresh outputs; a graph's are overwritten)
    assert not copy.borrowed and copy.keys[0].data_ptr() != first.keys[0].data_ptr()
    assert all(torch.equal(a, b) for a, b in zip([*copy.keys, *copy.values], [*first.keys, *first.values]))
    assert graphs.replays == 5 and "3 of 3 row buckets" in graphs.describe()


@pytest.mark.parametrize("graphs", [False, True])
def test_warm_up_scores_every_group_count_where_hits_replay_graphs(graphs):
    """NativeRunner._warm_up_pages: where hits replay CUDA graphs (score_graphs_enabled: a GPU), one hit of
    every number of candidate groups an engine call holds, so each graph is captured at startup and not by
    the first batch of its size; elsewhere one. The cache is empty and its counters zero afterwards."""
    from hstu_opt.serve.runners.native import NativeRunner

    class Adapter:
        contextual_len, max_rows, score_graphs_enabled = 0, 3, graphs

        def __init__(self):
            self.scored = []

        def prefill(self, users):
            return [user_kv(1, 0)]

        def score_cached(self, kvs, cands):
            self.scored.append(len(kvs))

    runner = NativeRunner.__new__(NativeRunner)
    runner.store = PagedKVStore(SHAPE, 4 * SHAPE.page_bytes)
    adapter = Adapter()
    runner._warm_up_pages(adapter)
    assert adapter.scored == ([1, 2, 3] if graphs else [1])
    assert runner.store.stats.entries == 0 and runner.store.stats.inserts == 0
