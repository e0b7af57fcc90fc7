"""Eviction policies: which cached entry goes when the store is over its byte budget.

The store tells its policy what happened (inserted, accessed, removed) and asks it for a victim; the
policy never sees the entries themselves, so a new one (e.g. predicting a user's next visit) is one
new class and the store does not change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Hashable


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
