"""A rank request that names its user's cached history by reference (history_ref) instead of sending it:
the same scores as sending the history (bit for bit: the same cached K/V and scoring path), 409 once the
cache no longer holds it, and a clear 422 where the server keeps no cache."""

from __future__ import annotations

import numpy as np
import pytest

from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import start_server, user_body
from tests.serve.test_failures import entry_bytes

FP32_EXACT = 1e-6  # the serve tests' bar for the same scores computed in another batch shape


@pytest.fixture(scope="module")
def bundle(bundle_path):
    from hstu_opt.serve.served_bundle import ServedBundle

    return ServedBundle.open(bundle_path)


def by_ref(body: dict, ref: str, **extra) -> dict:
    return {"user_id": body["user_id"], "history_ref": ref, "candidates": body["candidates"], **extra}


def test_reference_scores_equal_the_history_and_pages_through_candidates(live, bundle):
    rng = np.random.default_rng(21)
    body = user_body(rng, bundle.cfg.num_items, 40, 2 * bundle.cfg.max_targets + 1, user_id="ref")
    with live.client() as c:
        first = c.post("/v1/rank", json=body).json()
        again = c.post("/v1/rank", json=body).json()
        ref = first["history_ref"]
        got = c.post("/v1/rank", json=by_ref(body, ref)).json()
        cols = c.post("/v1/rank", json=by_ref(body, ref, results_layout="columns")).json()
        page = c.post("/v1/rank", json=by_ref(body, ref) | {"candidates": body["candidates"][:3]}).json()
        other_user = c.post("/v1/rank", json=by_ref(body, ref) | {"user_id": "someone-else"})
    assert first["cache"] == "miss" and again["cache"] == got["cache"] == "hit"
    assert again["history_ref"] == got["history_ref"] == ref and got["truncated"] is False
    assert got["results"] == again["results"]  # bit for bit
    assert cols["columns"]["item_id"] == [r["item_id"] for r in got["results"]]
    # a page of 3 candidates: the same scores within fp32 (another group size: other GEMM shapes)
    want = {r["item_id"]: list(r["scores"].values()) for r in got["results"]}
    assert len(page["results"]) == 3 and page["cache"] == "hit"
    np.testing.assert_allclose([list(r["scores"].values()) for r in page["results"]],
                               [want[r["item_id"]] for r in page["results"]], atol=FP32_EXACT, rtol=0)
    # the reference names (user_id, history, query time): another user's request does not find it
    assert other_user.status_code == 409 and other_user.json()["field"] == "history_ref"


def test_reference_after_eviction_is_409_and_the_history_still_works(bundle_path, bundle):
    page = entry_bytes(bundle, 64)  # a pool of one page and no host tier: the next user evicts the first
    s = start_server(ServeSettings(bundle_path, cache_gb=page / 2**30, host_cache_gb=0, cache_page_rows=64,
                                   cache_policy="lru"))
    rng = np.random.default_rng(22)
    a, b = (user_body(rng, bundle.cfg.num_items, 30, 5, user_id=u) for u in "ab")
    try:
        with s.client() as c:
            first = c.post("/v1/rank", json=a).json()
            c.post("/v1/rank", json=b)
            gone = c.post("/v1/rank", json=by_ref(a, first["history_ref"]))
            resent = c.post("/v1/rank", json=a).json()
    finally:
        s.stop()
    assert gone.status_code == 409 and gone.json()["field"] == "history_ref" and "send the history" in gone.json()["error"]
    assert resent["cache"] == "miss" and resent["results"] == first["results"]


def test_no_cache_no_reference(bundle_path, bundle):
    s = start_server(ServeSettings(bundle_path, cache_gb=0))
    body = user_body(np.random.default_rng(23), bundle.cfg.num_items, 10, 4, user_id="x")
    try:
        with s.client() as c:
            plain = c.post("/v1/rank", json=body).json()
            r = c.post("/v1/rank", json=by_ref(body, "0" * 64 + ".60.0"))
    finally:
        s.stop()
    assert "history_ref" not in plain and plain["cache"] == "off"
    assert r.status_code == 422 and r.json()["field"] == "history_ref" and "no user cache" in r.json()["error"]
