"""Eviction policies (LRU, predictive) and the offline trace replayer with Belady (benchmarks/cache_trace.py)."""

from __future__ import annotations

import importlib.util
import math
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


def test_survival_is_kaplan_meier_with_censoring():
    # Four users seen once at t=0. u1 comes back at 100 s, u2 at 1000 s, u3 and u4 never (open gaps: censored).
    # Kaplan-Meier by hand for the seen-once class: S = 1 before 100 s; 3/4 after (4 at risk, 1 event);
    # 3/4 * 2/3 = 1/2 after 1000 s (3 at risk, 1 event); then flat: half the users never came back.
    clock = Clock()
    pred = PredictivePolicy(clock=clock)
    feed(pred, clock, [(0.0, "u1"), (0.0, "u2"), (0.0, "u3"), (0.0, "u4"), (100.0, "u1"), (1000.0, "u2")])
    clock.now = 1e5
    assert pred.survival(1, 50.0) == 1.0
    assert pred.survival(1, 5e4) == pytest.approx(0.5)
    s_between = pred.survival(1, 400.0)  # inside the grid bins holding the two events: between the steps
    assert 0.5 <= s_between <= 1.0


def test_predictive_evicts_the_user_least_likely_back():
    # 30 one-visit users who never return teach the policy that a first visit is usually the last (21 of 51
    # first visits came back, all after 100 s); 20 regulars come every 100 s. At equal ages and sizes the
    # newcomer goes, and LRU would take the regular.
    clock = Clock()
    pred, lru = PredictivePolicy(clock=clock), LRUPolicy()
    arrivals = [(float(t), f"reg{i}") for i in range(20) for t in range(0, 1001, 100)]
    arrivals += [(float(10 * i), f"once{i}") for i in range(30)]
    arrivals += [(950.0, "regular"), (1050.0, "regular"), (1050.0, "newcomer")]
    arrivals.sort(key=lambda x: x[0])
    feed(pred, clock, arrivals)
    feed(lru, Clock(), arrivals)
    clock.now = 1100.0
    p_reg, p_new = pred.return_probability(["regular", "newcomer"], 1100.0, 200.0)
    assert p_reg > p_new
    assert pred.victim_among({"regular", "newcomer"}) == "newcomer"
    assert lru.victim_among({"regular", "newcomer"}) == "regular"  # LRU: the order of the last requests
    assert pred.prefetch({"regular", "newcomer"}) == []  # prefetch off (prefetch_s 0)
    pred.prefetch_s = 200.0
    assert pred.prefetch({"regular", "newcomer"}) == ["regular"]  # more likely than not back within 200 s


def test_predictive_weighs_by_bytes_and_breaks_ties_by_age():
    clock = Clock()
    fresh = PredictivePolicy(clock=clock)
    feed(fresh, clock, [(0.0, "a"), (1.0, "b"), (2.0, "c")])
    assert fresh.victim() == "a"  # nothing learned yet: every score 0, the oldest goes (LRU)
    pred = PredictivePolicy(clock=clock)
    pattern = [(float(t), u) for t in range(0, 501, 50) for u in ("small", "big")]
    feed(pred, clock, pattern[:-2])
    pred.inserted("small", 1)  # the last visit: the same ages, the same gaps, one byte and ten
    pred.inserted("big", 10)
    clock.now = 520.0
    p_small, p_big = pred.return_probability(["small", "big"], 520.0, 100.0)
    assert p_small == p_big > 0
    assert pred.victim() == "big"


def test_predictive_learns_per_user_across_keys():
    clock = Clock()
    pred = PredictivePolicy(clock=clock)
    keys = [("u", "digest1", 0), ("u", "digest2", 0), ("u", "digest3", 0)]
    feed(pred, clock, [(0.0, keys[0]), (10.0, keys[1]), (20.0, keys[2])])
    assert pred.survival(3, 0.5) == pred.survival(2, 0.5)  # one class for 2-3 visits
    pred.removed(keys[0])
    (p,) = pred.return_probability(["u"], 25.0, 10.0)
    assert p > 0  # the user's history outlives the entry (an unknown user scores 0)
    assert pred.return_probability(["stranger"], 25.0, 10.0).tolist() == [0.0]


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
    # misses once per cycle. Once c's return time is learned the predictive policy keeps a. (Belady does
    # better still: it sometimes drops a for b, which returns 2 s sooner.)
    cycles = 20
    trace = periodic_trace(ct, cycles)
    lru, pred, opt = (ct.replay(trace, 2, name).hits for name in ("lru", "predictive", "belady"))
    assert lru == 10 * cycles - 1 - cycles  # a: 10 visits a cycle; its first and one a cycle miss; b, c never hit
    # a misses only while the policy learns: c and b reach the 4+ visit class in the 4th cycle, and the
    # horizon comes down from its 1-day start to this trace's seconds; 3 misses in the first 5 cycles
    assert pred >= 10 * cycles - 1 - 3
    longer = ct.replay(periodic_trace(ct, 2 * cycles), 2, "predictive").hits
    assert longer - pred == 10 * cycles  # and none after: every later visit of a hits
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


def test_predictive_bounds_its_work_by_sampling():
    """Past max_candidates candidates a victim comes from a seeded sample, past FIT_SAMPLE users a fit counts
    a seeded sample's open gaps: still a resident key, still a survival curve, and the same on a replay."""
    def run():
        clock = Clock()
        pred = PredictivePolicy(clock=clock, max_candidates=8)
        pred.FIT_SAMPLE = 16
        rng = np.random.default_rng(3)
        feed(pred, clock, sorted((float(t), int(u)) for t, u in zip(rng.integers(0, 5000, 300), rng.integers(0, 60, 300))))
        victims = []
        for _ in range(10):
            victims.append(pred.victim())
            pred.removed(victims[-1])
        curve = [pred.survival(v, t) for v in (1, 2, 5) for t in (30.0, 300.0, 3000.0)]
        return victims, curve

    (victims, curve), again = run(), run()
    assert (victims, curve) == again
    assert len(set(victims)) == 10 and all(0.0 <= s <= 1.0 for s in curve)


def test_predictive_forgets_users_past_max_users():
    """Past max_users the user unseen longest is forgotten, even with an entry still resident: that entry
    scores 0 (it goes first) and the horizon stays finite."""
    clock = Clock()
    pred = PredictivePolicy(clock=clock, max_users=3)
    feed(pred, clock, [(0.0, "a"), (10.0, "b"), (20.0, "c"), (30.0, "b"), (40.0, "c"), (50.0, "d")])
    clock.now = 60.0
    assert pred.return_probability(["a"], 60.0, 100.0).tolist() == [0.0]  # forgotten
    assert pred.victim() == "a"
    assert math.isfinite(pred.horizon)
    pred.removed("a")
    assert pred.victim() in {"b", "c", "d"} and math.isfinite(pred.horizon)
