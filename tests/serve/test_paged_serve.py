"""The paged cache in a live server: host-tier promotion and a deliberately tiny pool under concurrent
requests, every score exact against a server with the cache off (the same eager model, contiguous K/V)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import start_server, user_body
from tests.serve.test_failures import entry_bytes

FP32_EXACT = 1e-6


@pytest.fixture(scope="module")
def bundle(bundle_path):
    from hstu_opt.serve.served_bundle import ServedBundle

    return ServedBundle.open(bundle_path)


def scores(resp: dict) -> dict[int, list[float]]:
    return {r["item_id"]: list(r["scores"].values()) for r in resp["results"]}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    np.testing.assert_allclose(np.array([got[i] for i in want]), np.array(list(want.values())), atol=FP32_EXACT, rtol=0)


def cache_off_answers(bundle_path, bodies: list[dict]) -> list[dict]:
    """Each body's answer from a server with the cache off (the same eager model, contiguous K/V): what every
    cached answer must equal."""
    off = start_server(ServeSettings(bundle_path, engine="eager", cache_gb=0))
    try:
        with off.client() as c:
            return [c.post("/v1/rank", json=body).json() for body in bodies]
    finally:
        off.stop()


def test_host_tier_hit_is_promoted_and_exact(bundle_path, bundle):
    page = entry_bytes(bundle, 64)  # pages of 64 rows; a pool of one page, a host tier of four
    s = start_server(ServeSettings(bundle_path, cache_gb=page / 2**30, host_cache_gb=4 * page / 2**30,
                                   cache_page_rows=64, cache_policy="lru"))
    rng = np.random.default_rng(3)
    a, b = (user_body(rng, bundle.cfg.num_items, 50, 20, user_id=u) for u in "ab")
    try:
        with s.client() as c:
            got = [c.post("/v1/rank", json=body).json() for body in (a, b, a, b)]
            metrics = c.get("/metrics").text
        stats = s.runner.cache_stats()
    finally:
        s.stop()
    assert [g["cache"] for g in got] == ["miss", "miss", "hit", "hit"]  # from the host tier each time
    assert stats.promotions == 2 and stats.demotions == 3 and stats.host_hits == 2 and stats.evictions == 0
    assert_same(scores(got[2]), scores(got[0]))
    assert_same(scores(got[3]), scores(got[1]))
    for name in ("hstu_serve_cache_promotions_total 2.0", "hstu_serve_cache_demotions_total 3.0",
                 'hstu_serve_cache_tier_bytes{tier="host"}', 'hstu_serve_cache_tier_bytes{tier="device"}'):
        assert name in metrics


def test_tiny_pool_under_concurrent_requests_stays_exact(bundle_path, bundle):
    """A pool of 3 pages and a host tier of 3 for 8 users (1-3 pages each) sent at concurrency 8 in batches
    of up to 4: entries pinned by a running batch must survive its own prefills' evictions."""
    page = entry_bytes(bundle, 64)
    rng = np.random.default_rng(11)
    bodies = [user_body(rng, bundle.cfg.num_items, int(rng.integers(20, 150)), int(rng.integers(5, 40)),
                        user_id=f"u{i}") for i in range(8)]
    order = [bodies[i] for i in rng.permutation(np.repeat(np.arange(8), 3))]
    on = start_server(ServeSettings(bundle_path, cache_gb=3 * page / 2**30, host_cache_gb=3 * page / 2**30,
                                    cache_page_rows=64, max_batch=4, max_wait_ms=5))
    try:
        with on.client() as c, ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda body: c.post("/v1/rank", json=body).json(), order))
            again = [c.post("/v1/rank", json=body).json() for body in bodies[:3] for _ in range(2)]
        stats = on.runner.cache_stats()
    finally:
        on.stop()
    want = cache_off_answers(bundle_path, bodies)
    assert {g["cache"] for g in got} <= {"hit", "miss"} and want[0]["cache"] == "off"
    by_user = {b["user_id"]: w for b, w in zip(bodies, want)}
    for body, g in zip(order + [b for b in bodies[:3] for _ in range(2)], got + again):
        assert_same(scores(g), scores(by_user[body["user_id"]]))
    assert [g["cache"] for g in again[1::2]] == ["hit"] * 3  # a user's repeat right after its request
    assert stats.evictions + stats.demotions > 0  # the pool really was too small
    assert stats.bytes <= 3 * page and stats.host_bytes <= 3 * page


class OverwrittenBuffers:
    """serve/graphs.PrefillGraphs as a GPU runs it: each replay's K/V are views of the same output buffers, which
    the next replay overwrites (on the CPU the staged prefill returns fresh tensors, which would hide a K/V kept
    past the next replay). Also counts the replays."""

    def __init__(self, graphs):
        self.graphs, self.replays, self._buffers = graphs, 0, None

    def ready(self, rows: int) -> bool:
        return self.graphs.ready(rows)

    def describe(self) -> str:
        return self.graphs.describe()

    def run(self, ids, ratings, timestamps, query_time):
        from hstu_opt.serve.kv_cache import UserKV

        kv = self.graphs.run(ids, ratings, timestamps, query_time)
        if self._buffers is None:
            self._buffers = [t.new_zeros((self.graphs.max_rows, *t.shape[1:])) for t in (*kv.keys, *kv.values)]
        n, views = kv.rows, []
        for buf, t in zip(self._buffers, (*kv.keys, *kv.values)):
            buf[:n].copy_(t)
            views.append(buf[:n])
        self.replays += 1
        half = len(views) // 2
        return UserKV(views[:half], views[half:], borrowed=True)


def test_a_batch_of_misses_prefills_through_the_graphs_one_by_one(bundle_path, bundle):
    """A batch of up to engines.GRAPH_PREFILL_USERS misses prefills each user as its own graph replay (a GPU's
    eager prefill is launch-bound: n users cost at least one's eager time); more misses take one eager call.
    Scores equal a cache-off server's, and every user's cached K/V stays its own (the next replay overwrites
    the graph's buffers: each entry is stored before it)."""
    from hstu_opt.serve.engines import GRAPH_PREFILL_USERS
    from hstu_opt.serve.graphs import PrefillGraphs

    assert 4 <= GRAPH_PREFILL_USERS < 8
    rng = np.random.default_rng(5)
    bodies = [user_body(rng, bundle.cfg.num_items, int(rng.integers(64, 128)), int(rng.integers(5, 40)),
                        user_id=f"u{i}") for i in range(12)]  # (histories of one length class share a batch)
    on = start_server(ServeSettings(bundle_path, engine="eager", cache_gb=0.05, max_batch=8, max_wait_ms=1000))
    adapter = on.runner.adapter
    cfg = adapter.model.cfg
    graphs = PrefillGraphs(adapter.model, cfg.contextual_len + cfg.max_history_len, step=32)
    graphs.capture()
    adapter.prefill_graphs = OverwrittenBuffers(graphs)
    replays = []
    try:
        with on.client() as c, ThreadPoolExecutor(8) as pool:
            got = []
            for batch in (bodies[:4], bodies[4:]):  # a batch of 4 misses (at max_wait), then one of 8 (full)
                got += pool.map(lambda body: c.post("/v1/rank", json=body).json(), batch)
                replays.append(adapter.prefill_graphs.replays)
            again = [c.post("/v1/rank", json=body).json() for body in bodies]  # hits, each alone
            metrics = c.get("/metrics").text
    finally:
        on.stop()
    want = cache_off_answers(bundle_path, bodies)
    assert 'hstu_serve_batch_size_bucket{kind="rank",le="4.0"} 13.0' in metrics  # the 4 misses' batch, 12 hits
    assert 'hstu_serve_batch_size_count{kind="rank"} 14.0' in metrics and 'le="8.0"} 14.0' in metrics
    assert [g["cache"] for g in got] == ["miss"] * 12 and [g["cache"] for g in again] == ["hit"] * 12
    assert replays == [4, 4]  # the 4 misses replayed one by one; the 8 went eagerly, in one call
    for g, a, w in zip(got, again, want):
        assert_same(scores(g), scores(w))
        assert_same(scores(a), scores(w))
