"""Eviction policies (LRU, predictive) and the offline trace replayer with Belady (benchmarks/cache_trace.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from hstu_opt.data.movielens import Interactions
from hstu_opt.serve.kv_cache import LRUPolicy, PredictivePolicy

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ct():
    spec = importlib.util.spec_from_file_location("cache_trace", ROOT / "benchmarks" / "cache_trace.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cache_trace"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(policy, clock: Clock, arrivals: list[tuple[float, object]], nbytes: int = 1) -> None:
    """Play (time, key) arrivals into a policy the way KVStore does: insert once, then access."""
    seen = set()
    for t, key in arrivals:
        clock.now = t
        policy.accessed(key) if key in seen else policy.inserted(key, nbytes)
        seen.add(key)


def test_predictive_evicts_user_predicted_to_return_last():
    # a comes every 10 s, b every 1000 s; at t=1010 a was seen 980 s ago, b 10 s ago.
    arrivals = [(float(t), "a") for t in range(0, 31, 10)] + [(0.0, "b"), (1000.0, "b")]
    arrivals.sort(key=lambda x: x[0])
    clock = Clock()
    pred, lru = PredictivePolicy(clock=clock), LRUPolicy()
    feed(pred, clock, arrivals)
    feed(lru, Clock(), arrivals)
    clock.now = 1010.0
    assert pred.expected_wait("a", 1010.0) == pytest.approx(10 + 980)
    assert pred.expected_wait("b", 1010.0) == pytest.approx(1000 + 10)
    assert pred.victim() == "b"  # expected back in 1010 s, a in 990 s
    assert lru.victim() == "a"  # LRU only sees that a is older


def test_predictive_weighs_by_bytes_and_uses_prior_for_new_users():
    clock = Clock()
    pred = PredictivePolicy(clock=clock, prior_gap_s=50.0)
    pred.inserted("small", 1)
    pred.inserted("big", 10)
    assert pred.expected_wait("small", 0.0) == 50.0  # no gap observed anywhere yet: prior_gap_s
    assert pred.victim() == "big"  # same expected wait, ten times the bytes
    clock.now = 20.0
    pred.accessed("small")  # first observed gap: 20 s, which becomes the prior of users seen once
    assert pred.expected_wait("big", 20.0) == pytest.approx(20.0 + 20.0)


def test_predictive_learns_per_user_across_keys():
    clock = Clock()
    pred = PredictivePolicy(clock=clock)
    feed(pred, clock, [(0.0, ("u", "digest1", 0)), (10.0, ("u", "digest2", 0)), (20.0, ("u", "digest3", 0))])
    assert pred.expected_wait("u", 20.0) == pytest.approx(10.0)  # two 10 s gaps, three different keys
    pred.removed(("u", "digest1", 0))
    assert pred.expected_wait("u", 25.0) == pytest.approx(15.0)  # the user's history outlives the entry


def test_belady_on_the_textbook_trace(ct):
    # The classic reference string with 3 equal frames: OPT has 7 misses (5 hits), LRU 10 misses (2 hits).
    users = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]
    trace = [ct.Request(float(i), u, 1) for i, u in enumerate(users)]
    assert ct.replay(trace, 3, "belady").hits == 5
    assert ct.replay(trace, 3, "lru").hits == 2


def periodic_trace(ct, cycles: int) -> list:
    """a every 10 s; c and b every 100 s, arriving (at +45, +48) just after one of a's visits."""
    reqs = [ct.Request(float(t), 0, 1) for t in range(0, 100 * cycles, 10)]
    reqs += [ct.Request(100.0 * k + 45, 2, 1) for k in range(cycles)]
    reqs += [ct.Request(100.0 * k + 48, 1, 1) for k in range(cycles)]
    return sorted(reqs, key=lambda r: (r.time, r.user))


def test_predictive_beats_lru_where_lru_thrashes(ct):
    # Capacity 2: at +48 LRU evicts a (seen 8 s ago) rather than c (3 s ago, back only in 97 s), so a
    # misses once per cycle. Once c's gap is learned the predictive policy keeps a. (Belady does better still:
    # it sometimes drops a for b, which returns 2 s sooner.)
    cycles = 20
    trace = periodic_trace(ct, cycles)
    lru, pred, opt = (ct.replay(trace, 2, name).hits for name in ("lru", "predictive", "belady"))
    assert lru == 10 * cycles - 1 - cycles  # a: 10 visits a cycle; its first and one a cycle miss; b, c never hit
    assert pred >= 10 * cycles - 1 - 2  # a misses at most in the first cycles, before c's gap is known
    assert lru < pred <= opt


def test_build_trace_sessionizes_and_sizes(ct):
    # user 7: ratings at 0, 100, 5000 (a new session: gap > 1800), 5100; user 3: one rating at 50.
    data = Interactions(users=np.array([7, 7, 3, 7, 7]), items=np.arange(5), ratings=np.ones(5),
                        timestamps=np.array([0, 100, 50, 5000, 5100]), fingerprint="x")
    cfg = ct.TraceConfig(session_gap_s=1800, max_rows=2, bytes_per_row=10)
    trace = ct.build_trace(data, cfg)
    assert [(r.time, r.user, r.nbytes) for r in trace] == [(0.0, 7, 10), (50.0, 3, 10), (5000.0, 7, 20)]
    assert ct.distinct_bytes(trace) == 30
    assert ct.next_use(trace) == [2, float("inf"), float("inf")]


def test_replay_is_deterministic(ct):
    rng = np.random.default_rng(0)
    trace = [ct.Request(float(t), int(u), int(b)) for t, u, b in
             zip(np.sort(rng.integers(0, 10_000, 400)), rng.integers(0, 40, 400), rng.integers(1, 50, 400))]
    total = ct.distinct_bytes(trace)
    for name in ("lru", "predictive", "belady"):
        runs = [ct.replay(trace, total // 5, name) for _ in range(2)]
        assert runs[0] == runs[1]
        assert 0 < runs[0].hits < len(trace)


def test_gap_closed(ct):
    assert ct.gap_closed(0.2, 0.3, 0.4) == pytest.approx(0.5)
    assert ct.gap_closed(0.5, 0.5, 0.5) is None


def test_paged_replay_runs_the_served_store(ct):
    """replay_paged (the real PagedKVStore): with one-row pages it is the byte-exact replay, hit for hit;
    with 4-row pages a 1-row entry holds a whole page, so fewer users fit."""
    rng = np.random.default_rng(1)
    bpr = 16
    trace = [ct.Request(float(t), int(u), int(r) * bpr) for t, u, r in
             zip(np.sort(rng.integers(0, 10_000, 400)), rng.integers(0, 40, 400), rng.integers(1, 9, 400))]
    cap = ct.distinct_bytes(trace) // 4
    for name in ("lru", "predictive", "belady"):
        exact, one_row = ct.replay(trace, cap, name), ct.replay_paged(trace, cap, name, 1, bpr)
        assert (one_row.hits, one_row.bytes_moved, one_row.append_bytes) == (exact.hits, exact.bytes_moved,
                                                                             exact.append_bytes), name
    small = [ct.Request(float(t), u, bpr) for t, u in enumerate([1, 2, 3, 1, 2, 3])]  # 1-row entries, 3 users
    assert ct.replay(small, 3 * bpr, "lru").hits == 3  # 3 rows of room: everyone fits
    assert ct.replay_paged(small, 4 * bpr, "lru", 4, bpr).hits == 0  # 4 rows = one 4-row page: one user at a time
