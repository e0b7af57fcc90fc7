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
    off = start_server(ServeSettings(bundle_path, engine="eager", cache_gb=0))
    try:
        with off.client() as c:
            want = [c.post("/v1/rank", json=body).json() for body in bodies]
    finally:
        off.stop()
    assert {g["cache"] for g in got} <= {"hit", "miss"} and want[0]["cache"] == "off"
    by_user = {b["user_id"]: w for b, w in zip(bodies, want)}
    for body, g in zip(order + [b for b in bodies[:3] for _ in range(2)], got + again):
        assert_same(scores(g), scores(by_user[body["user_id"]]))
    assert [g["cache"] for g in again[1::2]] == ["hit"] * 3  # a user's repeat right after its request
    assert stats.evictions + stats.demotions > 0  # the pool really was too small
    assert stats.bytes <= 3 * page and stats.host_bytes <= 3 * page
