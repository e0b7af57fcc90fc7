"""A lone request run on the event loop's thread (--inline-lone, Scheduler.run_now): it takes the engine
only when the worker is idle and nothing is queued, the engine never runs on two threads at once, and
it answers exactly what the worker would."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from hstu_opt.serve.scheduler import BatchPolicy, Scheduler, SchedulerClosed
from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import start_server, user_body


class Engine:
    """An execute() that records which thread ran each batch and fails if two run at once."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.running, self.overlaps, self.threads, self.lock = seconds, 0, 0, [], threading.Lock()

    def __call__(self, bucket, batch):
        with self.lock:
            self.running += 1
            self.overlaps += self.running > 1
        self.threads.append(threading.get_ident())
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        if any(j.payload == "bad" for j in batch):
            raise ValueError("bad payload")
        return [j.payload * 2 for j in batch]


def test_run_now_runs_on_the_caller_when_idle_and_declines_otherwise():
    engine = Engine()
    s = Scheduler(engine, BatchPolicy(max_batch=4, max_wait_s=0))
    s.start()
    done = s.run_now("x", 21)
    assert done is not None and done.result(0) == 42 and engine.threads == [threading.get_ident()]
    bad = s.run_now("x", "bad")
    with pytest.raises(ValueError):
        bad.result(0)
    # with the worker busy, run_now declines (the request queues)
    slow = Scheduler(Engine(0.3), BatchPolicy(max_batch=1, max_wait_s=0))
    slow.start()
    queued = slow.submit("x", 1)
    time.sleep(0.05)  # the worker has taken it
    assert slow.run_now("x", 2) is None
    assert queued.result(10) == 2
    for sched in (s, slow):
        sched.close()
        sched.join(10)
    with pytest.raises(SchedulerClosed):
        s.run_now("x", 1)


def test_the_engine_never_runs_on_two_threads_at_once():
    engine = Engine(0.002)
    s = Scheduler(engine, BatchPolicy(max_batch=4, max_wait_s=0))
    s.start()
    results = {}

    def caller(k: int) -> None:  # several "event loops" racing the worker
        for i in range(40):
            v = k * 1000 + i
            done = s.run_now("x", v)
            results[v] = done.result(10) if done is not None else s.submit("x", v).result(10)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(caller, range(4)))
    s.close()
    s.join(10)
    assert engine.overlaps == 0
    assert results == {v: 2 * v for v in results} and len(results) == 160
    assert len(set(engine.threads)) > 1  # both paths ran


@pytest.fixture(scope="module")
def servers(bundle_path):
    worker = start_server(ServeSettings(bundle_path, cache_gb=0, inline_lone=False))
    inline = start_server(ServeSettings(bundle_path, cache_gb=0, inline_lone=True))
    yield worker, inline
    worker.stop()
    inline.stop()


def test_inline_answers_what_the_worker_answers(servers, bundle_path):
    from hstu_opt.serve.served_bundle import ServedBundle

    worker, inline = servers
    assert inline.runner.batching.inline_lone and inline.runner._alone is not None
    assert worker.runner._alone is None
    num_items = ServedBundle.open(bundle_path).limits.num_items
    bodies = [user_body(np.random.default_rng(i), num_items, 5 + 7 * i, 9, user_id=f"u{i}") for i in range(6)]
    with worker.client() as cw, inline.client() as ci:
        for body in bodies:
            a, b = cw.post("/v1/rank", json=body), ci.post("/v1/rank", json=body)
            assert a.status_code == b.status_code == 200
            assert a.json()["results"] == b.json()["results"]
            assert b.json()["timing_ms"]["queue"] <= 0.05  # it ran at once, on the loop's thread
        # concurrent requests: all answered, and the same answers
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda body: ci.post("/v1/rank", json=body).json()["results"], bodies * 4))
        assert got == [cw.post("/v1/rank", json=b).json()["results"] for b in bodies] * 4


def test_inline_rule():
    """auto: only graph replays inline; the flags win; never with a batching wait."""
    from hstu_opt.serve.runners.native import ALWAYS, NEVER, REPLAYS, inline_rule

    assert inline_rule(BatchPolicy(max_wait_s=0, inline_lone=None))[0] == REPLAYS
    assert inline_rule(BatchPolicy(max_wait_s=0, inline_lone=True)) == (ALWAYS, "on: --inline-lone")
    assert inline_rule(BatchPolicy(max_wait_s=0, inline_lone=False)) == (NEVER, "off: --no-inline-lone")
    mode, why = inline_rule(BatchPolicy(max_wait_s=0.002, inline_lone=True))
    assert mode == NEVER and "--max-wait-ms" in why


class _Adapter:
    """What NativeRunner._replays asks of an engine adapter, answering as told."""

    def __init__(self, supports_cache: bool, full: bool = False, hits: bool = False, max_rows: int = 2):
        self.supports_cache, self.groups_via_prefill, self.max_rows = supports_cache, False, max_rows
        self.full, self.hits, self.asked = full, hits, []

    def replays(self, rows):
        self.asked.append(len(rows))
        return self.full

    def hit_replays(self, groups: int) -> bool:
        self.asked.append(groups)
        return self.hits


class _Store:
    def __init__(self, tiers: dict):
        self.tiers = tiers

    def tier_of(self, key):
        return self.tiers.get(key)


def test_auto_inlines_only_graph_replays():
    """The auto rule's test: a full forward only when every chunk of the request's rows has a captured graph;
    on the cached path only a history_ref hit whose entry is in the device pool, with its graph captured;
    never retrieval, a full-history request on the cached path, or an entry in the host tier."""
    from hstu_opt.serve.runners.base import RankInput
    from hstu_opt.serve.runners.native import RANK, RETRIEVE, NativeRunner

    one = np.ones(3, np.int64)
    full_history = RankInput("u", one, one, one, np.arange(1, 6), 100, None, False)  # 5 candidates
    by_ref = RankInput("u", one[:0], one[:0], one[:0], np.arange(1, 6), 100, None, False, ref=("u", "d", 100))
    r = NativeRunner.__new__(NativeRunner)
    r.max_targets = 2  # 5 candidates: 3 groups (rows), in chunks of max_rows 2: asked about 2, then 1
    r.store, r.adapter = None, _Adapter(supports_cache=False, full=True)
    assert r._replays((RANK, 0), full_history) and r.adapter.asked == [2, 1]
    r.adapter.full = False
    assert not r._replays((RANK, 0), full_history)
    assert not r._replays((RETRIEVE, 0), full_history)
    r.store, r.adapter = _Store({("u", "d", 100): "device"}), _Adapter(supports_cache=True, hits=True)
    assert r._replays((RANK, 0), by_ref) and r.adapter.asked == [3]
    assert not r._replays((RANK, 0), full_history)  # (its key is a hash of the history, made on the worker)
    r.store.tiers[("u", "d", 100)] = "host"
    assert not r._replays((RANK, 0), by_ref)  # (promotion first: a copy of the whole history)
    r.store.tiers.clear()
    assert not r._replays((RANK, 0), by_ref)  # (gone: the worker answers 409)
    r.store.tiers[("u", "d", 100)] = "device"
    r.adapter.hits = False
    assert not r._replays((RANK, 0), by_ref)  # (the first batch of its size captures the graph)
