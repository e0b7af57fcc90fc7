"""Engine failures (500, one request only), a full queue (503 + Retry-After), eviction under a tiny cache
budget, and the full-forward onnxruntime engine (cache off) — each on its own live server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hstu_opt.backends import onnxruntime as ort_backend
from hstu_opt.serve.engines import padded
from hstu_opt.serve.requests import rank_input
from hstu_opt.serve.schemas import RankRequest
from hstu_opt.serve.served_bundle import ServedBundle
from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import start_server, user_body

FP32_EXACT = 1e-6


@pytest.fixture(scope="module")
def bundle(bundle_path):
    return ServedBundle.open(bundle_path)


def post_all(url: str, bodies: list[dict]) -> list:
    import httpx

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: httpx.post(f"{url}/v1/rank", json=b, timeout=60), bodies))


def test_engine_failure_fails_that_request_only(bundle_path, bundle):
    """An engine call that raises for one request's candidate: that request gets 500 with a request id
    and no traceback; the requests batched with it, and the next one, succeed."""
    poison = bundle.cfg.num_items  # an item id only the failing request carries
    s = start_server(ServeSettings(bundle_path, max_batch=3, max_wait_ms=1500))  # the three share one batch
    real = s.runner.adapter.score_cached

    def failing(kvs, cands):
        if any(poison in c for c in cands):
            raise RuntimeError("injected engine failure")
        return real(kvs, cands)

    s.runner.adapter.score_cached = failing
    rng = np.random.default_rng(10)
    good = [user_body(rng, poison - 1, 10, 4, user_id=f"good{i}") for i in range(3)]
    bad = user_body(rng, poison - 1, 10, 4, user_id="bad")
    bad["candidates"][1] = poison
    try:
        responses = post_all(s.url, [good[0], bad, good[1]])
        after = post_all(s.url, [good[2]])[0]
        with s.client() as c:
            metrics = c.get("/metrics").text
    finally:
        s.stop()
    assert [r.status_code for r in responses] == [200, 500, 200]
    # two batches: the three together (<= 4, not <= 2), then `after` alone
    for series in ('_bucket{kind="rank",le="2.0"} 1.0', '_bucket{kind="rank",le="4.0"} 2.0', '_sum{kind="rank"} 4.0'):
        assert f"hstu_serve_batch_size{series}" in metrics, series
    err = responses[1].json()
    assert err["request_id"] == responses[1].headers["x-request-id"] and err["request_id"] in err["error"]
    assert "Traceback" not in responses[1].text and "injected" not in responses[1].text
    assert after.status_code == 200


def test_full_queue_503_with_retry_after(bundle_path, bundle):
    s = start_server(ServeSettings(bundle_path, max_queue=1, max_batch=1))
    try:
        entered, release = threading.Event(), threading.Event()
        real = s.runner.adapter.score_cached

        def blocking(kvs, cands):  # holds the worker: one request in the engine, the next in the queue
            entered.set()
            release.wait(30)
            return real(kvs, cands)

        s.runner.adapter.score_cached = blocking
        rng = np.random.default_rng(11)
        bodies = [user_body(rng, bundle.cfg.num_items, 5, 2, user_id=f"q{i}") for i in range(3)]
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post_all, s.url, bodies[:1])
            assert entered.wait(30)
            second = pool.submit(post_all, s.url, bodies[1:2])
            while s.runner.scheduler.depth < 1:
                assert not second.done()
                time.sleep(0.01)
            third = post_all(s.url, bodies[2:])[0]
            release.set()
            statuses = [first.result()[0].status_code, second.result()[0].status_code]
        assert statuses == [200, 200]
        assert third.status_code == 503 and int(third.headers["retry-after"]) >= 1
        assert third.json()["request_id"] == third.headers["x-request-id"]
    finally:
        release.set()
        s.stop()


def entry_bytes(bundle: ServedBundle, rows: int) -> int:
    """Bytes of one user's K/V (fp32): every layer keeps K [rows, H, dqk] and V [rows, H, dv]."""
    cfg = bundle.cfg
    return cfg.num_layers * rows * cfg.num_heads * (cfg.attention_dim + cfg.linear_dim) * 4


def test_eviction_under_tiny_budget_stays_exact(bundle_path, bundle):
    rows = 40
    budget = entry_bytes(bundle, 128) * 3 // 2  # a pool of one 128-row page: one user's entry, not two
    s = start_server(ServeSettings(bundle_path, cache_gb=budget / 2**30, host_cache_gb=0))  # (no host tier)
    try:
        rng = np.random.default_rng(12)
        a, b = (user_body(rng, bundle.cfg.num_items, rows, 20, user_id=u) for u in "ab")
        with s.client() as c:
            got = [c.post("/v1/rank", json=body).json() for body in (a, a, b, a)]
        stats = s.runner.cache_stats()
    finally:
        s.stop()
    assert [g["cache"] for g in got] == ["miss", "hit", "miss", "miss"]  # b evicted a; a again is a miss
    assert stats.evictions == 2 and stats.entries == 1 and stats.bytes <= budget
    first, again = (np.array([[r["scores"][t] for t in r["scores"]] for r in g["results"]]) for g in (got[0], got[3]))
    assert [r["item_id"] for r in got[0]["results"]] == [r["item_id"] for r in got[3]["results"]]
    np.testing.assert_allclose(again, first, atol=FP32_EXACT, rtol=0)


def test_onnxruntime_engine_full_forward_groups(bundle_path, bundle):
    """--cache-gb 0 on a CPU: auto picks onnxruntime (int8 when its gate passed), cache "off"; candidates
    beyond max_targets go as one padded row per group, equal to running the engine on each group."""
    s = start_server(ServeSettings(bundle_path, cache_gb=0))
    precision = "int8" if bundle.int8_passed() else "fp32"
    rng = np.random.default_rng(13)
    body = user_body(rng, bundle.cfg.num_items, 50, 2 * bundle.cfg.max_targets + 3)
    try:
        with s.client() as c:
            got = c.post("/v1/rank", json=body).json()
            info = c.get("/v1/model").json()["runner"]
    finally:
        s.stop()
    assert got["model"]["engine"] == f"onnxruntime.{precision}" and got["cache"] == "off"
    assert info["cache"] == {"enabled": False, "why": "--cache-gb 0"} and "cache off" in info["engine_reason"]
    sess = ort_backend.load(bundle.ort_session_dir("ranking", precision), f"ranking.{precision}")
    inp = rank_input(RankRequest.model_validate(body), bundle.limits)
    T = bundle.cfg.max_targets
    want = np.concatenate([ort_backend.run(sess, padded([inp], [inp.candidates[g:g + T]], 0).ranking_feed())["probs"][0]
                           for g in range(0, len(inp.candidates), T)])
    by_item = {r["item_id"]: list(r["scores"].values()) for r in got["results"]}
    np.testing.assert_allclose(np.array([by_item[c] for c in body["candidates"]]), want, atol=1e-5, rtol=1e-4)
