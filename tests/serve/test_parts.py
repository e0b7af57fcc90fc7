"""The server's parts alone (no HTTP, no model): cache store and policy, scheduler, request
normalization, and the engine rule."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import numpy as np
import pytest
import torch

from hstu_opt.errors import ServeError
from hstu_opt.model.config import HstuConfig
from hstu_opt.serve.engines import ENGINE_RULE, choose_engine
from hstu_opt.serve.kv_cache import KVStore, LRUPolicy, UserKV, history_digest
from hstu_opt.serve.app import parse_body
from hstu_opt.serve.client import encode_request
from hstu_opt.serve.requests import (InvalidRequest, RequestLimits, int_array, pack_int64, rank_input, retrieve_input,
                                     split_binary)
from hstu_opt.serve.runners.base import QueueFull
from hstu_opt.serve.scheduler import BatchPolicy, Scheduler, SchedulerClosed
from hstu_opt.serve.schemas import BASE64, BINARY_HEADER, RankRequest, RetrieveRequest
from hstu_opt.serve.served_bundle import COMPILED_DIR, INT8_ACCURACY, ORT_DIR, ServedBundle


def kv(rows: int) -> UserKV:
    return UserKV([torch.zeros(rows, 1, 2)], [torch.zeros(rows, 1, 2)])  # 2 * rows * 2 * 4 bytes


def test_lru_evicts_least_recently_used_within_budget():
    one = kv(4).nbytes
    store = KVStore(3 * one, LRUPolicy())
    for key in "abc":
        assert store.put(key, kv(4))
    assert store.get("a") is not None  # a is now the most recent: b goes first
    store.put("d", kv(4))
    assert "b" not in store and {"a", "c", "d"} == {k for k in "abcd" if k in store}
    store.put("e", kv(8))  # two entries' worth: evicts c then a
    assert [k for k in "acde" if k in store] == ["d", "e"]
    assert store.stats.bytes == 3 * one and store.stats.evictions == 3 and store.stats.entries == 2
    assert not store.put("huge", kv(16)) and store.stats.too_large == 1 and "huge" not in store
    assert (store.stats.hits, store.stats.misses) == (1, 0)


def test_history_digest_covers_every_row_field():
    ids, ratings, ts = np.arange(1, 5), np.ones(4, np.int64), np.arange(10, 14)
    base = history_digest(ids, ratings, ts, None)
    assert base == history_digest(ids.copy(), ratings.copy(), ts.copy(), None)
    changed = [history_digest(ids[::-1], ratings, ts, None), history_digest(ids, ratings * 2, ts, None),
               history_digest(ids, ratings, ts + 1, None), history_digest(ids, ratings, ts, np.array([3]))]
    assert len({base, *changed}) == 5


LIMITS = RequestLimits(num_items=50, num_ratings=5, max_history_len=4, max_targets=3, contextual_len=0,
                       contextual_cardinality=1, time_granularity_s=60)


def test_request_normalization_truncates_floors_and_defaults():
    body = {"history": {"item_ids": [1, 2, 3, 4, 5, 6], "timestamps": [1, 2, 3, 4, 5, 185]}, "candidates": [7]}
    inp = rank_input(RankRequest.model_validate(body), LIMITS)
    assert inp.item_ids.tolist() == [3, 4, 5, 6] and inp.timestamps.tolist() == [3, 4, 5, 185] and inp.truncated
    assert inp.ratings.tolist() == [0] * 4 and inp.query_time == 180  # the last timestamp, floored to 60 s
    assert rank_input(RankRequest.model_validate(body | {"query_time": 239}), LIMITS).query_time == 180


def test_packed_arrays_equal_lists_and_bad_packing_names_the_field():
    body = {"history": {"item_ids": [1, 2, 3], "ratings": [1, 0, 2], "timestamps": [5, 6, 70]}, "candidates": [7, 8],
            "query_time": 100}
    want = rank_input(RankRequest.model_validate(body), LIMITS)
    packed_body = {**body, "history": {k: pack_int64(v) for k, v in body["history"].items()},
                   "candidates": pack_int64(body["candidates"])}
    got = rank_input(RankRequest.model_validate_json(json.dumps(packed_body)), LIMITS)
    for name in ("item_ids", "ratings", "timestamps", "candidates"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == np.int64 and a.flags.writeable and a.tolist() == b.tolist(), name
    assert got.query_time == want.query_time
    seven = base64.b64encode(b"\x01" * 7).decode()  # 7 bytes: not whole int64 values
    assert not re.fullmatch(BASE64, seven)  # the published pattern admits whole int64 values only ...
    with pytest.raises(InvalidRequest) as err:  # ... and the decoder enforces it
        rank_input(RankRequest.model_validate({**body, "candidates": seven}), LIMITS)
    assert err.value.field == "candidates" and "multiple of 8" in str(err.value)
    # whitespace, no padding, not base64, too much padding, not ASCII: none matches the published pattern
    for bad in ("AAAA AAAAAAA=", "AAAAAAAAAAA", "AAAAAAAAAA!=", "AAAAAAAAAAA==", "AAAAAAAAAA\u00e9="):
        assert not re.fullmatch(BASE64, bad)
        with pytest.raises(InvalidRequest) as err:
            int_array(bad, "candidates")
        assert err.value.field == "candidates"
    assert pack_int64([1, -2, 2**62]) == base64.b64encode(np.array([1, -2, 2**62], "<i8").tobytes()).decode()
    assert re.fullmatch(BASE64, pack_int64([1, 2, 3, 4])) and int_array(pack_int64([1, 2, 3, 4]), "x").tolist() == [1, 2, 3, 4]
    with pytest.raises(InvalidRequest) as err:  # packed ids are range-checked like listed ones
        rank_input(RankRequest.model_validate({**body, "candidates": pack_int64([7, 0])}), LIMITS)
    assert err.value.field == "candidates[1]"


def sent(body: dict, arrays: str, model=RankRequest, limits=LIMITS):
    """A request encoded as a client sends it (encode_request), then parsed and normalized as the server does."""
    content, headers = encode_request(body, arrays)
    req, binary = parse_body(model, content, headers.get(BINARY_HEADER))
    return (rank_input if model is RankRequest else retrieve_input)(req, limits, binary=binary)


def test_binary_bodies_equal_lists_and_packed():
    """A binary body (the JSON, then the arrays as raw little-endian int64 in BINARY_FIELDS order) is the same
    request as lists and as packed arrays, for any subset of fields sent that way; arrays come out writable."""
    body = {"history": {"item_ids": [1, 2, 3], "ratings": [1, 0, 2], "timestamps": [5, 6, 70]}, "candidates": [7, 8, 9, 7],
            "query_time": 100}
    want = sent(body, "list")
    for arrays in ("binary", "packed"):
        got = sent(body, arrays)
        for name in ("item_ids", "ratings", "timestamps", "candidates"):
            a = getattr(got, name)
            assert a.dtype == np.int64 and a.flags.writeable and a.tolist() == getattr(want, name).tolist(), (arrays, name)
        assert got.query_time == want.query_time
    content, headers = encode_request(body, "binary")
    n = int(headers[BINARY_HEADER])
    assert headers["content-type"] == "application/octet-stream" and len(content) == n + 8 * (3 * 3 + 4)
    assert json.loads(content[:n])["history"]["item_ids"] == {"binary_data_size": 24}
    assert content[n:n + 24] == np.array([1, 2, 3], "<i8").tobytes()  # item_ids first, then ratings, timestamps, candidates
    mixed = {**body, "history": {**body["history"], "ratings": None}}  # no ratings: the rest keep their order
    assert sent(mixed, "binary").ratings.tolist() == [0, 0, 0]
    only = {**body, "history": {k: pack_int64(v) for k, v in body["history"].items()}}  # packed history, binary candidates
    assert sent(only, "binary").candidates.tolist() == [7, 8, 9, 7]
    retrieve = {k: v for k, v in body.items() if k != "candidates"}
    assert sent(retrieve, "binary", RetrieveRequest).item_ids.tolist() == [1, 2, 3]
    ref = {"user_id": "u", "history_ref": "0" * 64 + ".60.0", "candidates": [7, 8]}  # candidates binary by reference
    content, headers = encode_request(ref, "binary")
    req, binary = parse_body(RankRequest, content, headers[BINARY_HEADER])
    assert rank_input(req, LIMITS, True, binary).candidates.tolist() == [7, 8]


def test_bad_binary_bodies_name_the_field():
    body = {"history": {"item_ids": [1, 2], "timestamps": [5, 6]}, "candidates": [7]}
    content, headers = encode_request(body, "binary")
    n = int(headers[BINARY_HEADER])

    def error(raw: bytes, header: str | None) -> InvalidRequest:
        with pytest.raises(InvalidRequest) as err:
            req, binary = parse_body(RankRequest, raw, header)
            rank_input(req, LIMITS, binary=binary)
        return err.value

    for header in ("0", "-3", "abc", "1e3", str(len(content) + 1), "\u0663"):  # not a length within the body
        e = error(content, header)
        assert e.field == BINARY_HEADER and "length in bytes" in str(e), header
    e = error(content[:n], None)  # binary fields, no binary section
    assert e.field == "history.item_ids" and BINARY_HEADER in str(e)
    e = error(content[:-8], str(n))  # one value short
    assert e.field == "body" and "declare 40" in str(e) and "32 bytes" in str(e)
    e = error(content + b"\0" * 8, str(n))  # one value over
    assert e.field == "body" and "48 bytes" in str(e)
    listed = json.dumps(body).encode()
    e = error(listed + b"\0" * 8, str(len(listed)))  # bytes after an all-JSON request
    assert e.field == "body" and "no field is binary" in str(e)
    odd = json.loads(content[:n])
    odd["candidates"] = {"binary_data_size": 7}
    head = json.dumps(odd).encode()
    e = error(head + content[n:-1], str(len(head)))
    assert e.field == "candidates" and "multiple of 8" in str(e)
    assert split_binary(listed, str(len(listed))) == (listed, b"")  # a header naming the whole body: all JSON
    content, headers = encode_request({**body, "candidates": [7, 0]}, "binary")  # range-checked like listed ids
    req, binary = parse_body(RankRequest, content, headers[BINARY_HEADER])
    with pytest.raises(InvalidRequest) as err:
        rank_input(req, LIMITS, binary=binary)
    assert err.value.field == "candidates[1]"


def run_scheduler(policy: BatchPolicy, jobs: list[tuple[str, int]]):
    batches = []

    def execute(bucket, batch):
        batches.append((bucket, [j.payload for j in batch]))
        return [j.payload * 10 for j in batch]

    s = Scheduler(execute, policy)
    futures = [s.submit(bucket, payload) for bucket, payload in jobs]
    s.start()
    results = [f.result(10) for f in futures]
    s.close()
    s.join(10)
    return batches, results


def test_scheduler_batches_by_bucket_up_to_max_batch():
    jobs = [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("b", 5), ("a", 6)]
    batches, results = run_scheduler(BatchPolicy(max_batch=2, max_wait_s=0.05), jobs)
    assert results == [10, 20, 30, 40, 50, 60]
    # oldest first: a's first batch, then b (now the oldest), then a's rest
    assert batches == [("a", [1, 3]), ("b", [2, 5]), ("a", [4, 6])]


def test_scheduler_isolates_a_failing_job_and_drains_on_close():
    def execute(bucket, batch):
        if any(j.payload == "bad" for j in batch):
            raise ValueError("bad payload")
        return [j.payload.upper() for j in batch]

    s = Scheduler(execute, BatchPolicy(max_batch=8, max_wait_s=0.05))
    futures = [s.submit("x", p) for p in ("a", "bad", "c")]
    s.start()
    s.close()  # already queued jobs still run
    s.join(10)
    assert futures[0].result() == "A" and futures[2].result() == "C"
    with pytest.raises(ValueError):
        futures[1].result()
    with pytest.raises(SchedulerClosed):
        s.submit("x", "late")


def test_scheduler_queue_full_raises_with_retry_after():
    gate = threading.Event()

    def execute(bucket, batch):
        gate.wait(10)
        return [None] * len(batch)

    s = Scheduler(execute, BatchPolicy(max_batch=1, max_queue=1))
    s.start()
    first = s.submit("x", 1)
    while s.depth:  # the worker has taken it and waits on the gate
        time.sleep(0.005)
    s.submit("x", 2)
    with pytest.raises(QueueFull) as err:
        s.submit("x", 3)
    assert err.value.retry_after_s >= 1
    gate.set()
    first.result(10)
    s.close()
    s.join(10)


# ---- the engine rule ----------------------------------------------------------------------------
def fake_bundle(tmp_path, *, ort=("fp32", "int8"), int8_passed=True, compiled_gpu: str | None = None) -> ServedBundle:
    cfg = HstuConfig(embedding_dim=8, num_layers=1, num_heads=1, attention_dim=4, linear_dim=4, max_history_len=8,
                     max_targets=2, num_items=10)
    for precision in ort:
        for kind in ("ranking", "retrieval"):
            (tmp_path / ORT_DIR).mkdir(parents=True, exist_ok=True)
            (tmp_path / ORT_DIR / f"{kind}.{precision}.session.json").write_text("{}")
    (tmp_path / INT8_ACCURACY).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / INT8_ACCURACY).write_text(json.dumps({"passed": int8_passed}))
    if compiled_gpu:
        (tmp_path / COMPILED_DIR).mkdir(parents=True)
        (tmp_path / COMPILED_DIR / "ranking.compiled.json").write_text(json.dumps({"device": "cuda", "gpu": compiled_gpu}))
    manifest = {"name": "fake", "version": "1", "recipe": {"export": {"max_batch": 4}}}
    return ServedBundle(tmp_path, manifest, cfg)


@pytest.mark.parametrize("gpu, compiled_gpu, cache_on, int8_passed, want", [
    (None, None, True, True, "eager"),  # CPU, cache on: the cached path needs the PyTorch model
    (None, None, False, True, "onnxruntime.int8"),
    (None, None, False, False, "onnxruntime.fp32"),  # the INT8 gate failed
    ("NVIDIA H200", "NVIDIA H200", True, True, "compiled"),
    ("NVIDIA H200", "NVIDIA L4", True, True, "eager"),  # compiled for another GPU
    (None, "NVIDIA H200", False, True, "onnxruntime.int8"),  # no GPU here
])
def test_auto_engine_rule(tmp_path, gpu, compiled_gpu, cache_on, int8_passed, want):
    bundle = fake_bundle(tmp_path, int8_passed=int8_passed, compiled_gpu=compiled_gpu)
    choice = choose_engine(bundle, "auto", cache_on, gpu)
    assert choice.label == want and choice.reason.startswith("auto:")
    assert ENGINE_RULE.startswith("auto:")


def test_asked_engine_missing_from_bundle_names_what_it_has(tmp_path):
    with pytest.raises(ServeError, match="no compiled engine .* onnxruntime.fp32"):
        choose_engine(fake_bundle(tmp_path), "compiled", True, None)
    with pytest.raises(ServeError, match="no onnxruntime engine"):
        choose_engine(fake_bundle(tmp_path / "b", ort=()), "onnxruntime", False, None)
    assert choose_engine(fake_bundle(tmp_path / "c", int8_passed=False), "onnxruntime", True, None).label == "onnxruntime.fp32"


def test_scheduler_flush_runs_a_batch_that_would_wait_to_fill():
    s = Scheduler(lambda bucket, batch: [j.payload for j in batch], BatchPolicy(max_batch=8, max_wait_s=600))
    s.start()
    future = s.submit("x", 1)
    time.sleep(0.05)
    assert not future.done()  # waiting for 7 more jobs or 600 s
    s.flush()
    assert future.result(10) == 1
    s.close()
    s.join(10)


def test_event_loop_and_http_parser_settings(bundle_path, monkeypatch):
    """--loop / --http: auto takes uvloop / httptools when installed (the serve extra has both), an explicit
    choice is kept, and asking for one that is not installed is a clear error naming the extra."""
    import importlib.util

    from hstu_opt.serve.settings import ServeSettings

    auto = ServeSettings(bundle_path)
    assert (auto.loop_used, auto.http_used) == ("uvloop", "httptools")
    plain = ServeSettings(bundle_path, loop="asyncio", http="h11")
    assert (plain.loop_used, plain.http_used) == ("asyncio", "h11")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "httptools" else real(name, *a))
    assert ServeSettings(bundle_path).http_used == "h11"
    with pytest.raises(ServeError, match=r"--http httptools: httptools is not installed: pip install 'hstu-opt\[serve\]'"):
        ServeSettings(bundle_path, http="httptools")


def test_cache_prefetch_setting(bundle_path):
    """--cache-prefetch-s reaches the predictive policy; with lru (which predicts nothing) or below 0 it is a
    clear error naming the option."""
    from hstu_opt.serve.kv_cache import PredictivePolicy, make_policy
    from hstu_opt.serve.settings import ServeSettings

    assert ServeSettings(bundle_path, cache_prefetch_s=60.0).cache_prefetch_s == 60.0
    policy = make_policy("predictive", 60.0)
    assert isinstance(policy, PredictivePolicy) and policy.prefetch_s == 60.0 and policy.prefetches
    assert not make_policy("predictive").prefetches and not make_policy("lru").prefetches
    with pytest.raises(ServeError, match="--cache-prefetch-s 60: prefetching needs --cache-policy predictive"):
        ServeSettings(bundle_path, cache_policy="lru", cache_prefetch_s=60.0)
    with pytest.raises(ServeError, match="--cache-prefetch-s -1.0: must be at least 0"):
        ServeSettings(bundle_path, cache_prefetch_s=-1.0)
