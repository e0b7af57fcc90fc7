"""The user cache: each user's per-layer K/V of [contextual][history] rows, under a byte budget.

Exact by construction: the key holds a digest of every history row and the floored query time, so
an entry is reused only for a request whose prefill would compute the very same K/V. Which entry
goes when the budget is exceeded is the policy's choice (policy.py). Single-threaded: only the
scheduler's worker thread touches a store; `stats` is read (not written) by /metrics.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from torch import Tensor

from hstu_opt.serve.cache_keys import CacheKey
from hstu_opt.serve.kv_cache.policy import EvictionPolicy, LRUPolicy

@dataclass
class UserKV:
    """One user's cache entry: what HstuModel.prefill keeps for its rows, one tensor pair per layer."""

    keys: list[Tensor]  # each [Lc, H, dqk], Lc = contextual + history rows
    values: list[Tensor]  # each [Lc, H, dv]
    borrowed: bool = False  # views of a buffer the next prefill overwrites (a prefill graph's output)

    def owned(self) -> UserKV:
        """This entry, safe to keep past the next prefill: a copy where it is borrowed."""
        if not self.borrowed:
            return self
        return UserKV([k.clone() for k in self.keys], [v.clone() for v in self.values])

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class CacheStats:
    hits: int = 0  # both tiers (host_hits: those found in the host tier, promoted first)
    misses: int = 0
    inserts: int = 0
    evictions: int = 0  # entries that left the cache (the paged store: dropped from its last tier)
    too_large: int = 0  # entries larger than the whole budget, not stored
    bytes: int = 0  # the device tier's (the paged store: whole pages)
    entries: int = 0
    # the paged store (paged.py) only
    host_hits: int = 0
    promotions: int = 0  # host tier -> device tier, on a hit
    demotions: int = 0  # device tier -> host tier, on an eviction from the device tier
    prefetches: int = 0  # host tier -> device tier, ahead of a request (the policy's prefetch)
    no_room: int = 0  # entries not stored: every device page was pinned by the running batch
    host_bytes: int = 0
    host_entries: int = 0


class KVStore:
    def __init__(self, budget_bytes: int, policy: EvictionPolicy | None = None):
        self.budget_bytes = budget_bytes
        self.policy = policy or LRUPolicy()
        self.stats = CacheStats()
        self._entries: dict[Hashable, UserKV] = {}

    def get(self, key: CacheKey) -> UserKV | None:
        kv = self._entries.get(key)
        if kv is None:
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.policy.accessed(key)
        return kv

    def put(self, key: CacheKey, kv: UserKV) -> bool:
        """Store `kv` (evicting as the policy says until it fits); False when it exceeds the whole budget."""
        if kv.nbytes > self.budget_bytes:
            self.stats.too_large += 1
            return False
        if key in self._entries:
            self._remove(key)
        while self.stats.bytes + kv.nbytes > self.budget_bytes:
            self._remove(self.policy.victim())
            self.stats.evictions += 1
        self._entries[key] = kv
        self.policy.inserted(key, kv.nbytes)
        self.stats.inserts += 1
        self._account(kv.nbytes, +1)
        return True

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def _remove(self, key: Hashable) -> None:
        kv = self._entries.pop(key)
        self.policy.removed(key)
        self._account(kv.nbytes, -1)

    def _account(self, nbytes: int, sign: int) -> None:
        self.stats.bytes += sign * nbytes
        self.stats.entries += sign
