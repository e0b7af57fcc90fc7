"""Every route of a live server (eager engine, cache on) against the model computed directly."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from hstu_opt.model.checkpoint import load_checkpoint
from hstu_opt.model.scoring import to_tensors
from hstu_opt.serve.client import encode_request, unpack_results
from hstu_opt.serve.engines import padded
from hstu_opt.serve.requests import floor_time, pack_int64, rank_input
from hstu_opt.serve.schemas import BINARY_HEADER, RankRequest
from hstu_opt.serve.served_bundle import CHECKPOINT, ServedBundle
from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import user_body

FP32_EXACT = 1e-6  # hit vs miss: the same K/V through the same scoring path
FP32_TOL = dict(atol=1e-5, rtol=1e-4)  # cached scoring vs a full forward (tests/conftest TOLERANCES)
DELAYED_ACK_MS = 40  # Linux's minimum delayed-ACK timeout


@pytest.fixture(scope="module")
def bundle(bundle_path):
    return ServedBundle.open(bundle_path)


@pytest.fixture(scope="module")
def model(bundle_path):
    return load_checkpoint(bundle_path / CHECKPOINT)[0]


def full_forward(model, bundle, body: dict) -> np.ndarray:
    """Reference: model.rank (the engine contract) per group of max_targets candidates -> [M, T]."""
    inp = rank_input(RankRequest.model_validate(body), bundle.limits)
    T = bundle.cfg.max_targets
    out = []
    for g in range(0, len(inp.candidates), T):
        cands = inp.candidates[g:g + T]
        feed = padded([inp], [cands], bundle.cfg.contextual_len).ranking_feed()
        with torch.no_grad():
            out.append(model.rank(**to_tensors(feed))[0, :len(cands)].numpy())
    return np.concatenate(out)


def scores_by_item(resp: dict, tasks: list[str]) -> dict[int, list[float]]:
    return {r["item_id"]: [r["scores"][t] for t in tasks] for r in resp["results"]}


def as_array(resp: dict, candidates: list[int], tasks: list[str]) -> np.ndarray:
    by_item = scores_by_item(resp, tasks)
    return np.array([by_item[c] for c in candidates], np.float32)


def test_rank_groups_miss_then_hit_equal(live, bundle, model):
    """More candidates than max_targets: scored in groups against one prefill, equal to a full forward per
    group; the repeat is a cache hit with the same scores; results come sorted by the first task."""
    rng = np.random.default_rng(1)
    tasks = list(bundle.cfg.ranking_tasks)
    body = user_body(rng, bundle.cfg.num_items, 60, 3 * bundle.cfg.max_targets + 5, user_id="groups")
    with live.client() as c:
        first, second = c.post("/v1/rank", json=body).json(), c.post("/v1/rank", json=body).json()
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    got = as_array(first, body["candidates"], tasks)
    np.testing.assert_allclose(got, full_forward(model, bundle, body), **FP32_TOL)
    np.testing.assert_allclose(as_array(second, body["candidates"], tasks), got, atol=FP32_EXACT, rtol=0)
    first_task = [r["scores"][tasks[0]] for r in first["results"]]
    assert first_task == sorted(first_task, reverse=True)
    assert first["model"] == {"name": bundle.name, "version": bundle.version, "engine": "eager"}
    assert first["truncated"] is False and first["timing_ms"]["total"] > 0
    phases = first["timing_ms"]  # the route's phases, in order, each within the total
    assert list(phases)[0] == "input" and list(phases)[-3:] == ["reply", "response", "total"]
    assert all(0 <= v <= phases["total"] for v in phases.values())


def test_packed_arrays_give_the_same_scores_and_server_timing(live, bundle):
    """The packed form (base64 of little-endian int64) is the same request as JSON lists; every response
    says how long the server took in a Server-Timing header (>= the route's own timing_ms.total)."""
    rng = np.random.default_rng(11)
    tasks = list(bundle.cfg.ranking_tasks)
    body = user_body(rng, bundle.cfg.num_items, 40, 9, user_id="packed")
    packed = {**body, "history": {k: pack_int64(v) for k, v in body["history"].items() if v is not None},
              "candidates": pack_int64(body["candidates"])}
    with live.client() as c:
        listed = c.post("/v1/rank", json=body | {"user_id": None})
        sent = c.post("/v1/rank", json=packed | {"user_id": None})
        bad = c.post("/v1/rank", json=packed | {"candidates": "not base64!"})
    assert listed.status_code == sent.status_code == 200, sent.text
    np.testing.assert_array_equal(as_array(sent.json(), body["candidates"], tasks),
                                  as_array(listed.json(), body["candidates"], tasks))
    whole = float(sent.headers["server-timing"].split("dur=")[1])
    assert whole >= sent.json()["timing_ms"]["total"] > 0
    assert bad.status_code == 422 and bad.json()["field"] == "candidates"


def test_binary_bodies_give_the_same_answers(live, bundle):
    """A binary body (JSON, then the arrays raw: hstu_opt.serve.client.encode_request) ranks and retrieves
    exactly as the JSON request does; a bad Inference-Header-Content-Length is a 422 naming it."""
    rng = np.random.default_rng(13)
    tasks = list(bundle.cfg.ranking_tasks)
    body = user_body(rng, bundle.cfg.num_items, 40, bundle.cfg.max_targets + 2, user_id=None)
    retrieve = {k: v for k, v in body.items() if k != "candidates"} | {"k": 5}
    with live.client() as c:
        listed = c.post("/v1/rank", json=body)
        sent = c.post("/v1/rank", content=(enc := encode_request(body, "binary"))[0], headers=enc[1])
        r_listed = c.post("/v1/retrieve", json=retrieve)
        r_sent = c.post("/v1/retrieve", content=(r_enc := encode_request(retrieve, "binary"))[0], headers=r_enc[1])
        bad = c.post("/v1/rank", content=enc[0], headers={**enc[1], BINARY_HEADER: "12x"})
        short = c.post("/v1/rank", content=enc[0][:-8], headers=enc[1])
    assert listed.status_code == sent.status_code == r_sent.status_code == 200, sent.text
    np.testing.assert_array_equal(as_array(sent.json(), body["candidates"], tasks),
                                  as_array(listed.json(), body["candidates"], tasks))
    assert r_sent.json()["results"] == r_listed.json()["results"]
    assert bad.status_code == 422 and bad.json()["field"] == BINARY_HEADER
    assert short.status_code == 422 and short.json()["field"] == "body"


def test_columns_and_packed_layouts_equal_items(live, bundle):
    """results_layout "columns" and "packed": the same ids in the same order with the same scores (bit for
    bit) as the default items layout, one list (or base64 array) per field in place of `results`; every
    other key as with items. Packed scores are float32: the engine's values, which items' JSON floats widen."""
    rng = np.random.default_rng(12)
    tasks = list(bundle.cfg.ranking_tasks)
    body = user_body(rng, bundle.cfg.num_items, 30, 2 * bundle.cfg.max_targets + 3, user_id="columns")
    with live.client() as c:
        c.post("/v1/rank", json=body)  # (a miss: the answers below are hits, the same scoring path)
        items = c.post("/v1/rank", json=body).json()
        columns = c.post("/v1/rank", json=body | {"results_layout": "columns"}).json()
        packed = c.post("/v1/rank", json=body | {"results_layout": "packed"}).json()
    assert list(items) == ["results", "model", "cache", "truncated", "history_ref", "timing_ms"]
    assert list(columns) == ["columns", "model", "cache", "truncated", "history_ref", "timing_ms"]
    assert list(packed) == ["packed", "model", "cache", "truncated", "history_ref", "timing_ms"]
    assert items["cache"] == columns["cache"] == packed["cache"] == "hit"
    assert items["model"] == columns["model"] == packed["model"]
    assert columns["columns"]["item_id"] == [r["item_id"] for r in items["results"]]
    assert columns["columns"]["scores"] == {t: [r["scores"][t] for r in items["results"]] for t in tasks}
    ids, scores = unpack_results(packed["packed"])
    assert ids.dtype == np.int64 and ids.tolist() == columns["columns"]["item_id"]
    assert list(scores) == tasks
    for t in tasks:
        assert scores[t].dtype == np.float32 and scores[t].tolist() == columns["columns"]["scores"][t]


def test_query_time_floored_and_defaulted(live, bundle):
    """Query times within one granularity step share the cache entry and the scores; a null query time
    means the last history timestamp."""
    rng = np.random.default_rng(2)
    g = bundle.serving.time_granularity_s
    body = user_body(rng, bundle.cfg.num_items, 20, 8, user_id="floor")
    last = body["history"]["timestamps"][-1]
    base = floor_time(last, g)
    with live.client() as c:
        a = c.post("/v1/rank", json=body | {"query_time": base}).json()
        b = c.post("/v1/rank", json=body | {"query_time": base + g - 1}).json()
        d = c.post("/v1/rank", json=body | {"query_time": None}).json()
        later = c.post("/v1/rank", json=body | {"query_time": base + 10 * g}).json()
    assert (a["cache"], b["cache"], later["cache"]) == ("miss", "hit", "miss")
    assert d["cache"] == "hit"  # null = the last timestamp, floored to `base` like a
    assert scores_by_item(a, ["watched"]) == scores_by_item(b, ["watched"]) == scores_by_item(d, ["watched"])


def test_truncated_history_keeps_most_recent_rows(live, bundle):
    rng = np.random.default_rng(3)
    n = bundle.cfg.max_history_len
    long = user_body(rng, bundle.cfg.num_items, n + 25, 5, user_id=None)
    short = {**long, "history": {k: v[-n:] for k, v in long["history"].items()}}
    with live.client() as c:
        got_long, got_short = c.post("/v1/rank", json=long).json(), c.post("/v1/rank", json=short).json()
    assert got_long["truncated"] is True and got_short["truncated"] is False
    assert got_long["results"] == got_short["results"]
    assert got_short["cache"] == "hit"  # the same kept rows: the same cache entry


def test_retrieve_top_k(live, bundle, model):
    rng = np.random.default_rng(4)
    body = user_body(rng, bundle.cfg.num_items, 30, 0)
    del body["candidates"]
    inp = rank_input(RankRequest.model_validate(body | {"candidates": [1]}), bundle.limits)
    with torch.no_grad():
        feed = padded([inp], [np.zeros(0, np.int64)], 0).retrieval_feed()
        scores = model.item_table().numpy() @ model.retrieve(**to_tensors(feed))[0].numpy()
    k = 10
    with live.client() as c:
        kept = c.post("/v1/retrieve", json=body | {"k": k, "exclude_seen": False}).json()
        unseen = c.post("/v1/retrieve", json=body | {"k": k, "exclude_seen": True}).json()
    want = np.argsort(-scores)[:k] + 1
    assert [r["item_id"] for r in kept["results"]] == want.tolist()
    np.testing.assert_allclose([r["score"] for r in kept["results"]], scores[want - 1], **FP32_TOL)
    seen = set(body["history"]["item_ids"])
    assert len(unseen["results"]) == k and not seen & {r["item_id"] for r in unseen["results"]}


def test_model_health_ready_and_metrics(live, bundle):
    with live.client() as c:
        info = c.get("/v1/model").json()
        health, ready = c.get("/healthz"), c.get("/readyz")
        c.post("/v1/rank", json={"history": {"item_ids": [1], "timestamps": [5]}, "candidates": [2]})
        metrics = c.get("/metrics").text
        docs, openapi = c.get("/docs"), c.get("/openapi.json").json()
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    listed, packed, binary = openapi["components"]["schemas"]["History"]["properties"]["item_ids"]["oneOf"]
    assert listed["items"] == {"type": "integer", "minimum": 1, "maximum": bundle.cfg.num_items}
    assert packed["type"] == "string" and packed["contentEncoding"] == "base64"
    assert binary == {"$ref": "#/components/schemas/BinaryArray"}
    rank = openapi["paths"]["/v1/rank"]["post"]  # the binary body: its header and its media type
    assert [p["name"] for p in rank["parameters"]] == ["Inference-Header-Content-Length"]
    assert set(rank["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert info["name"] == bundle.name and info["limits"]["max_targets"] == bundle.cfg.max_targets
    assert info["runner"]["engine"] == "eager" and "cache on" in info["runner"]["engine_reason"]
    assert info["runner"]["cache"]["enabled"] is True and info["runner"]["engine_rule"].startswith("auto:")
    assert health.json() == {"status": "ok"} and ready.json() == {"ready": True, "engine": "eager"}
    for series in ('hstu_serve_requests_total{route="/v1/rank",status="200"}', "hstu_serve_request_seconds_bucket",
                   'hstu_serve_batch_size_count{kind="rank"}', "hstu_serve_queue_depth", "hstu_serve_cache_hits_total",
                   "hstu_serve_cache_misses_total", "hstu_serve_cache_evictions_total", "hstu_serve_cache_bytes"):
        assert series in metrics, series
    hits = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("hstu_serve_cache_hits_total")))
    assert hits == live.runner.cache_stats().hits > 0


REF = "0" * 64 + ".60.0"  # a well-formed history_ref


def as_ref(body: dict, ref: str, **extra) -> None:
    """body -> a request by history_ref (no history, no query time) plus extra fields."""
    body.pop("history")
    body.pop("query_time")
    body.update(history_ref=ref, **extra)


BAD = [  # (mutation of a valid body, the field the 422 must name)
    (lambda b: b["history"].update(item_ids=[0] + b["history"]["item_ids"][1:]), "history.item_ids[0]"),
    (lambda b: b.update(candidates=[1, 10**9]), "candidates[1]"),
    (lambda b: b["history"].update(timestamps=b["history"]["timestamps"][:-1]), "history.timestamps"),
    (lambda b: b["history"].update(ratings=[1]), "history.ratings"),
    (lambda b: b["history"].update(item_ids=[], timestamps=[], ratings=[]), "history.item_ids"),
    (lambda b: b["history"]["timestamps"].__setitem__(2, -5), "history.timestamps[2]"),
    (lambda b: b.update(query_time=-1), "query_time"),
    (lambda b: b.update(contextual_ids=[1, 2]), "contextual_ids"),
    (lambda b: b.update(candidates=[]), "candidates"),
    (lambda b: b["history"]["item_ids"].__setitem__(1, "seven"), "history.item_ids[1]"),
    (lambda b: b.pop("candidates"), "candidates"),
    (lambda b: b.update(extra_field=1), "extra_field"),
    (lambda b: b.update(results_layout="rows"), "results_layout"),
    (lambda b: b.pop("history"), "history"),
    (lambda b: b.update(history_ref=REF), "history"),  # both: one or the other
    (lambda b: as_ref(b, "not-a-ref"), "history_ref"),
    (lambda b: as_ref(b, REF, query_time=60), "query_time"),  # the reference holds the query time
]


@pytest.mark.parametrize("mutate, field", BAD, ids=[f for _, f in BAD])
def test_bad_input_422_names_the_field(live, bundle, mutate, field):
    body = user_body(np.random.default_rng(5), bundle.cfg.num_items, 6, 3)
    mutate(body)
    with live.client() as c:
        r = c.post("/v1/rank", json=body)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == field and err["error"].startswith(f"{field}:") and "\n" not in err["error"]
    assert err["request_id"] == r.headers["x-request-id"]


def test_not_json_and_wrong_k(live):
    with live.client() as c:
        r = c.post("/v1/rank", content=b"{not json", headers={"content-type": "application/json"})
        k = c.post("/v1/retrieve", json={"history": {"item_ids": [1], "timestamps": [1]}, "k": 0})
    assert r.status_code == 422 and r.json()["field"] == "body"
    assert k.status_code == 422 and k.json()["field"] == "k"


def test_body_over_limit_413(live, bundle_path):
    limit = ServeSettings(bundle_path).max_body_bytes  # the live server's (default) limit
    body = {"history": {"item_ids": [1], "timestamps": [1]}, "candidates": [1] * (limit // 2)}  # "1," per id
    with live.client() as c:
        r = c.post("/v1/rank", json=body)
        after = c.post("/v1/rank", json={"history": {"item_ids": [1], "timestamps": [1]}, "candidates": [1]})
    assert r.status_code == 413 and r.json()["field"] == "body" and "limit" in r.json()["error"]
    assert after.status_code == 200


def test_keep_alive_responses_do_not_wait_for_delayed_acks(live):
    """The listening socket says TCP, so asyncio sets TCP_NODELAY on each connection: a keep-alive request
    is not held ~40 ms (a delayed ACK) between the response's header and body writes."""
    with live.client() as c:
        c.get("/healthz")
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            c.get("/healthz")
            times.append((time.perf_counter() - t0) * 1e3)
    assert np.median(times) < DELAYED_ACK_MS / 2, times
