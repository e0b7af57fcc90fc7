"""Eviction policies: which cached entry goes when the store is over its byte budget.

The store tells its policy what happened (inserted, accessed, removed) and asks it for a victim; the
policy never sees the entries themselves, so a new one (e.g. predicting a user's next visit) is one
new class and the store does not change.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass


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
    """Evict the entry whose user is expected to come back last, per byte it holds.

    Each *user* (the first element of a tuple key such as the server's (user, digest, time bucket), else
    the key itself; a tuple key whose user is None is its own "user") keeps two numbers: the time of its
    last request and an exponentially decayed mean of its inter-arrival gaps (weight `decay` on the newest
    gap). Learning per user, not per key, matters because a returning user's history digest has changed:
    the new key is new, but the user's past arrivals still say when they tend to come back.

    Model: inter-arrival times are heavy-tailed (people return in bursts, then sometimes never), taken as
    Lomax (Pareto II) with shape 2 and mean `gap`; its mean residual life after `elapsed` seconds without a
    request is gap + elapsed. That expected wait per byte held is the eviction score (largest goes):
    it blends frequency (gap) with recency (elapsed), and with equal gaps and sizes it reduces to LRU.

    One visit: events of a user less than `same_visit_s` after their last one count as the same visit,
    not a new arrival (a batch holding several keys of one user; an entry replaced right after its hit).

    Prefetch (the paged store's host tier): a host-tier entry whose user is due back within `prefetch_s`
    seconds (default 0: off, until a trace says what pays) is promoted into free device pages.

    Prior: a user seen once has no gap yet; it gets the mean of all gaps observed so far (over all users),
    or `prior_gap_s` before any gap was seen. Time comes from `clock` (default time.monotonic), so a trace
    replayer can drive it with trace timestamps. `victim()` scans the resident entries (O(entries)): scores
    change with `now`, so a heap ordered once would go stale; a byte-budgeted store of per-user K/V holds
    thousands of entries, not millions.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, decay: float = 0.5,
                 prior_gap_s: float = 3600.0, same_visit_s: float = 1.0, max_users: int = 1_000_000,
                 prefetch_s: float = 0.0) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay {decay}: must be in (0, 1]")
        self.clock, self.decay, self.prior_gap_s, self.max_users = clock, decay, prior_gap_s, max_users
        self.same_visit_s, self.prefetch_s = same_visit_s, prefetch_s
        self._users: OrderedDict[Hashable, _Arrivals] = OrderedDict()  # least recently seen first
        self._sizes: dict[Hashable, int] = {}  # resident key -> bytes
        self._gap_sum, self._gap_count = 0.0, 0

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
        now = self.clock()
        return max(keys, key=lambda k: self.expected_wait(user_of(k), now) * self._sizes[k], default=None)

    def prefetch(self, keys: Collection[Hashable]) -> list[Hashable]:
        """Host-tier entries whose user's next request is due (last request + mean gap) within
        `prefetch_s` seconds (0: never), soonest first. Users with one request so far have no gap: skipped."""
        if not self.prefetch_s:
            return []
        now, due = self.clock(), []
        for k in keys:
            seen = self._users.get(user_of(k))
            if seen is not None and seen.mean_gap is not None and seen.last + seen.mean_gap - now <= self.prefetch_s:
                due.append((seen.last + seen.mean_gap, k))
        return [k for _, k in sorted(due, key=lambda t: t[0])]

    def expected_wait(self, user: Hashable, now: float) -> float:
        """Expected seconds until `user`'s next request: gap + time since their last one (Lomax, shape 2)."""
        seen = self._users.get(user)
        if seen is None:
            return self._prior_gap()
        gap = seen.mean_gap if seen.mean_gap is not None else self._prior_gap()
        return gap + max(now - seen.last, 0.0)

    def _prior_gap(self) -> float:
        return self._gap_sum / self._gap_count if self._gap_count else self.prior_gap_s

    def _arrival(self, user: Hashable) -> None:
        now = self.clock()
        seen = self._users.get(user)
        if seen is None:
            self._users[user] = _Arrivals(last=now)
            if len(self._users) > self.max_users:  # bound memory: forget the user unseen longest
                self._users.popitem(last=False)
            return
        self._users.move_to_end(user)
        gap = now - seen.last
        if gap < self.same_visit_s:
            return
        seen.mean_gap = gap if seen.mean_gap is None else self.decay * gap + (1 - self.decay) * seen.mean_gap
        seen.last = now
        self._gap_sum += gap
        self._gap_count += 1


@dataclass
class _Arrivals:
    last: float  # clock time of the user's latest request
    mean_gap: float | None = None  # decayed mean inter-arrival gap; None until a second request


def user_of(key: Hashable) -> Hashable:
    """The user a key belongs to: a tuple key's first element (the server's user_id), else the key."""
    if isinstance(key, tuple) and key and key[0] is not None:
        return key[0]
    return key


POLICIES = ("lru", "predictive")


def make_policy(name: str) -> EvictionPolicy:
    """The policy behind `--cache-policy NAME` (names in POLICIES; the settings validate them first)."""
    return {"lru": LRUPolicy, "predictive": PredictivePolicy}[name]()
