"""Eviction policies: which cached entry goes when the store is over its byte budget.

The store tells its policy what happened (inserted, accessed, removed) and asks it for a victim; the
policy never sees the entries themselves, so a new one (e.g. predicting a user's next visit) is one
new class and the store does not change.
"""

from __future__ import annotations

import math
import random
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass

import numpy as np


class EvictionPolicy(ABC):
    @abstractmethod
    def inserted(self, key: Hashable, nbytes: int) -> None:
        """A new entry of `nbytes` bytes is in the store."""

    @abstractmethod
    def accessed(self, key: Hashable) -> None:
        """A lookup found this entry."""

    @abstractmethod
    def removed(self, key: Hashable) -> None:
        """The entry left the store (evicted or replaced)."""

    @abstractmethod
    def victim(self) -> Hashable:
        """The entry to evict next; called only while the store holds at least one."""

    def victim_among(self, keys: Collection[Hashable]) -> Hashable | None:
        """The entry to evict next among `keys` (a subset of the resident ones: the paged store's entries of
        one tier that no running batch pins); None when `keys` is empty. The paged store needs it; a policy
        for the unpaged KVStore alone (the trace's Belady oracle) may leave it out."""
        raise NotImplementedError(f"{type(self).__name__} cannot choose among a subset (the paged store needs it)")

    def prefetch(self, keys: Collection[Hashable]) -> list[Hashable]:
        """Entries among `keys` (the paged store's host tier) worth promoting to the device tier now, most
        wanted first; the store promotes them only into free pages (no eviction). Default: none."""
        return []

    @property
    def prefetches(self) -> bool:
        """Whether prefetch() can name anything (the store skips listing its host tier when not)."""
        return False


class LRUPolicy(EvictionPolicy):
    """Least recently used (inserted or accessed) goes first."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def inserted(self, key: Hashable, nbytes: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def accessed(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def removed(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self) -> Hashable:
        return next(iter(self._order))

    def victim_among(self, keys: Collection[Hashable]) -> Hashable | None:
        return next((k for k in self._order if k in keys), None)


class PredictivePolicy(EvictionPolicy):
    """Evict the entry least likely to be requested again within the cache's horizon, per byte it holds.

    Each *user* (the first element of a tuple key such as the server's (user, digest, time bucket), else
    the key itself; a tuple key whose user is None is its own "user") keeps three numbers: the time of its
    last request, how many visits it has made, and its time scale, an exponentially decayed mean of its
    inter-arrival gaps (weight `decay` on the newest). Learning per user, not per key, matters because a
    returning user's history digest has changed: the new key is new, but their past arrivals still count.

    Model (a survival model of the time to a user's next request, learned online from every request the
    policy sees, hits and misses alike, so the cache's own evictions do not censor what it learns):
      * A user's wait is their time scale times a residual whose distribution depends on their visit class
        (`visit_classes`): seen once (no scale yet: the wait in seconds), 2-3 visits, 4 or more (waits
        divided by the scale).
      * Each class's residual survival S(t) is a Kaplan-Meier estimate on a log-spaced grid (4 bins a decade):
        completed gaps are events; every known user's open gap (time since their last request) is a
        censored observation, so users who never came back pull S's floor up: "never returns" is learned,
        not assumed away. The scaled classes shrink toward their pooled hazard (`prior_n` pseudo-users).
        Refit every max(REFIT_MIN, users / 4) arrivals: O(1) per arrival amortized; past FIT_SAMPLE users
        the open gaps come from a random sample (the completed ones are always all counted).
      * Score of an entry: P(its user returns within the horizon H | no request for `age` seconds) =
        1 - S(age + H) / S(age), in the class's units, divided by the entry's bytes; the lowest goes
        (ties: the user seen longest ago first, so with nothing learned yet it is LRU).
      * H is the cache's eviction horizon: a running geometric mean of the victims' ages (weight 0.1 on the
        newest; `horizon_s` before the first eviction). An entry is worth keeping if its user comes back
        before the cache would have let it go anyway.

    One visit: events of a user less than `same_visit_s` after their last one count as the same visit,
    not a new arrival (a batch holding several keys of one user; an entry replaced right after its hit).

    Prefetch (the paged store's host tier): a host-tier entry whose user is more likely than not to return
    within `prefetch_s` seconds (default 0: off; on the ML-100k trace it does not pay, docs/serving.md) is
    promoted into free device pages.

    Time comes from `clock` (default time.monotonic), so a trace replayer can drive it with trace
    timestamps. `victim_among()` scores every candidate (vectorized, O(entries)): scores change with `now`,
    so a heap ordered once would go stale; above `max_candidates` candidates it scores a random sample of
    that many, so an eviction's cost is bounded (0.4 ms at 1,000 candidates on a 2-core CPU, 0.9-2.5 ms at
    10k-100k: benchmarks/cache_trace.py's `policy_cost`; smaller samples cost hit rate on the trace, its
    `ablations`). A resident entry whose user was forgotten (`max_users`) scores 0: it goes first.
    """

    RAW_EDGES = np.concatenate([[0.0], np.geomspace(60.0, 3.2e8, 29)])  # seconds: 0, 1 min .. 10 years
    SCALED_EDGES = np.concatenate([[0.0], np.geomspace(1e-3, 1e4, 29)])  # multiples of the user's scale
    FIT_SAMPLE = 16384  # more known users than this: a fit counts the open gaps of a random sample of this many
    REFIT_MIN = 16  # arrivals between refits, at least (a fit costs O(users): amortized O(1) per arrival)

    def __init__(self, clock: Callable[[], float] = time.monotonic, decay: float = 0.5, horizon_s: float = 86400.0,
                 prior_n: float = 5.0, same_visit_s: float = 1.0, max_users: int = 1_000_000,
                 prefetch_s: float = 0.0, visit_classes: tuple[int, ...] = (2, 4), per_user_scale: bool = True,
                 adaptive_horizon: bool = True, max_candidates: int = 1024) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay {decay}: must be in (0, 1]")
        if horizon_s <= 0:
            raise ValueError(f"horizon_s {horizon_s}: must be > 0")
        self.clock, self.decay, self.prior_n, self.max_users = clock, decay, prior_n, max_users
        self.same_visit_s, self.prefetch_s, self.horizon_s = same_visit_s, prefetch_s, horizon_s
        self.horizon = horizon_s  # seconds: the running eviction horizon H
        # the model's parts, switchable for benchmarks/cache_trace.py's ablations (the defaults are the model)
        self.visit_classes, self.per_user_scale, self.adaptive_horizon = visit_classes, per_user_scale, adaptive_horizon
        self.max_candidates = max_candidates  # more candidates than this: score a random sample of this many
        self._users: OrderedDict[Hashable, _Arrivals] = OrderedDict()  # least recently seen first
        self._sizes: dict[Hashable, int] = {}  # resident key -> bytes
        n_cls, n_bins = len(visit_classes) + 1, len(self.RAW_EDGES)
        self._events = np.zeros((n_cls, n_bins))  # completed gaps per (class, bin)
        self._survival: np.ndarray | None = None  # [class, bin]: S at each edge, refit by fit()
        self._since_fit = 0
        self._rng = random.Random(0)  # the candidate sample: seeded, so a replay is deterministic

    # -- the store's events ------------------------------------------------------------------------
    def inserted(self, key: Hashable, nbytes: int) -> None:
        self._sizes[key] = nbytes
        self._arrival(user_of(key))

    def accessed(self, key: Hashable) -> None:
        self._arrival(user_of(key))

    def removed(self, key: Hashable) -> None:
        self._sizes.pop(key, None)  # the user's arrival history stays: it outlives their entries

    def victim(self) -> Hashable:
        return self.victim_among(self._sizes)

    def victim_among(self, keys: Collection[Hashable]) -> Hashable | None:
        if not keys:
            return None
        now, keys = self.clock(), list(keys)
        if len(keys) > self.max_candidates:  # a bounded cost per eviction, as LHD and Redis sample theirs
            keys = self._rng.sample(keys, self.max_candidates)
        seen = [self._users.get(user_of(k)) for k in keys]
        scores = self._probability(seen, now, self.horizon) / np.fromiter(map(self._sizes.__getitem__, keys),
                                                                           np.float64, len(keys))
        lasts = np.fromiter((-math.inf if s is None else s.last for s in seen), np.float64, len(keys))
        i = int(np.lexsort((lasts, scores))[0])
        if self.adaptive_horizon and seen[i] is not None:  # (a forgotten user's age is unknown)
            self.horizon = math.exp(0.9 * math.log(self.horizon) + 0.1 * math.log(max(now - lasts[i], 1.0)))
        return keys[i]

    @property
    def prefetches(self) -> bool:
        return self.prefetch_s > 0

    def prefetch(self, keys: Collection[Hashable]) -> list[Hashable]:
        """Host-tier entries whose user is more likely than not to return within `prefetch_s` seconds (0:
        never), by the same model as eviction; most likely first."""
        if not self.prefetch_s or not keys:
            return []
        keys = list(keys)
        p = self.return_probability([user_of(k) for k in keys], self.clock(), self.prefetch_s)
        return [keys[i] for i in np.argsort(-p, kind="stable") if p[i] >= 0.5]

    # -- the model ---------------------------------------------------------------------------------
    def return_probability(self, users: list[Hashable], now: float, horizon_s: float) -> np.ndarray:
        """P(each user's next request comes within `horizon_s` seconds of `now`), given none since their
        last one (a user the policy does not know: 0)."""
        return self._probability([self._users.get(u) for u in users], now, horizon_s)

    def _probability(self, seen: list[_Arrivals | None], now: float, horizon_s: float) -> np.ndarray:
        if self._survival is None or self._since_fit >= max(self.REFIT_MIN, len(self._users) // 4):
            self.fit(now)
        n = len(seen)
        cls = np.fromiter((-1 if s is None else s.cls for s in seen), np.int64, n)
        age = now - np.fromiter((now if s is None else s.last for s in seen), np.float64, n)
        scale = np.fromiter((self._scale(s) if s is not None else 1.0 for s in seen), np.float64, n)
        out = np.zeros(n)
        for c in range(len(self.visit_classes) + 1):
            sel = cls == c
            if sel.any():
                t, sc = np.maximum(age[sel], 0.0), scale[sel]
                s_now, s_then = self._surv(c, t / sc), self._surv(c, (t + horizon_s) / sc)
                out[sel] = np.where(s_now > 0, 1.0 - s_then / np.maximum(s_now, 1e-300), 0.0)
        return out

    def survival(self, visits: int, t: float) -> float:
        """The fitted S(t) of the class of users with `visits` visits (t in seconds for one visit, else in
        multiples of the user's scale): for tests and reports."""
        if self._survival is None:
            self.fit(self.clock())
        return float(self._surv(self._class(visits), np.array([t]))[0])

    def _class(self, visits: int) -> int:
        """0 for a user seen once, else how many of `visit_classes`' thresholds `visits` reaches."""
        return sum(visits >= v for v in self.visit_classes)

    def _scale(self, seen: _Arrivals) -> float:
        return (seen.scale or 1.0) if self.per_user_scale else 1.0

    def _edges(self, cls: int) -> np.ndarray:
        return self.SCALED_EDGES if cls and self.per_user_scale else self.RAW_EDGES

    def _bin(self, cls: int, t: float) -> int:
        return int(np.searchsorted(self._edges(cls), t, side="right")) - 1

    def fit(self, now: float) -> None:
        """Refit the survival curves at `now` (the policy does so itself every max(REFIT_MIN, users / 4) arrivals).
        Kaplan-Meier per class on the grid: hazard in bin j = gaps ended in j / gaps (ended or open) >= edge j."""
        users, weight = list(self._users.values()), 1.0
        if len(users) > self.FIT_SAMPLE:  # open gaps of a seeded sample, each counting for len/FIT_SAMPLE users
            users, weight = self._rng.sample(users, self.FIT_SAMPLE), len(users) / self.FIT_SAMPLE
        n = len(users)
        cls = np.fromiter((s.cls for s in users), np.int64, n)
        t = np.maximum(now - np.fromiter((s.last for s in users), np.float64, n), 0.0)
        t /= np.fromiter(map(self._scale, users), np.float64, n)
        censored = np.zeros_like(self._events)
        for c in range(len(censored)):
            bins = np.searchsorted(self._edges(c), t[cls == c], side="right") - 1
            censored[c] = weight * np.bincount(bins, minlength=censored.shape[1])
        at_risk = np.cumsum((self._events + censored)[:, ::-1], axis=1)[:, ::-1]
        hazard = self._events / np.maximum(at_risk, 1.0)
        pooled = self._events[1:].sum(0) / np.maximum(at_risk[1:].sum(0), 1.0)
        hazard[1:] = (self._events[1:] + self.prior_n * pooled) / (at_risk[1:] + self.prior_n)
        self._survival = np.concatenate([np.ones((len(hazard), 1)), np.cumprod(1.0 - hazard, axis=1)[:, :-1]], axis=1)
        self._since_fit = 0

    def _surv(self, cls: int, t: np.ndarray) -> np.ndarray:
        """S at `t`, interpolated linearly in log(1 + t / first edge) between the grid's edges."""
        edges = self._edges(cls)
        return np.interp(np.log1p(t / edges[1]), np.log1p(edges / edges[1]), self._survival[cls])

    def _arrival(self, user: Hashable) -> None:
        now = self.clock()
        seen = self._users.get(user)
        if seen is None:
            self._users[user] = _Arrivals(last=now)
            self._since_fit += 1
            if len(self._users) > self.max_users:  # bound memory: forget the user unseen longest
                self._users.popitem(last=False)
            return
        self._users.move_to_end(user)
        gap = now - seen.last
        if gap < self.same_visit_s:
            return
        self._events[seen.cls, self._bin(seen.cls, gap / self._scale(seen))] += 1
        seen.scale = gap if seen.scale is None else self.decay * gap + (1 - self.decay) * seen.scale
        seen.last, seen.visits = now, seen.visits + 1
        seen.cls = self._class(seen.visits)
        self._since_fit += 1


@dataclass
class _Arrivals:
    last: float  # clock time of the user's latest request
    visits: int = 1  # requests so far, `same_visit_s` apart
    scale: float | None = None  # decayed mean inter-arrival gap; None until a second visit
    cls: int = 0  # the visit class of `visits` (PredictivePolicy._class)


def user_of(key: Hashable) -> Hashable:
    """The user a key belongs to: a tuple key's first element (the server's user_id), else the key."""
    if isinstance(key, tuple) and key and key[0] is not None:
        return key[0]
    return key


POLICIES = ("lru", "predictive")


def make_policy(name: str, prefetch_s: float = 0.0) -> EvictionPolicy:
    """The policy behind `--cache-policy NAME` (names in POLICIES; the settings validate them first, and
    allow `--cache-prefetch-s` only with the predictive policy: LRU predicts nothing)."""
    return PredictivePolicy(prefetch_s=prefetch_s) if name == "predictive" else LRUPolicy()
