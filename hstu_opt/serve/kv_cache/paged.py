"""The paged user cache: preallocated page pools (device tier + pinned host tier), page tables, pinning.

Layout. A pool holds K as [layers, pages, page_rows, H, dqk] and V as [layers, pages, page_rows, H, dv]
(layer-major): one layer's pages are then one contiguous [pages * page_rows, H, d] matrix, which the
paged cached kernel reads with the contiguous kernel's strides (and TMA descriptors) plus one page-id
load per key block. A user's entry is a page list + a row count; its page table is that list padded.

Page size rule: page_rows is a multiple of the cached kernel's key block (BLOCK_N: 64 for 16-bit heads up
to 128, 32 for fp32 or heads of 256), so a key block never straddles two pages; the router launches the
kernel only for page sizes the GPU check sweeps (ops/hstu_attention/triton.CHECKED_PAGE_ROWS) and runs
the reference (a gather) otherwise. (The Gluon kernel's paged form: off, triton.PAGED_WS.) DEFAULT_PAGE_ROWS is provisional until benchmarks/gpu_paged.py's run:
smaller pages waste less (half a page per user on average) but cost a page-id load per key block.

Tiers. The device tier lives where the model runs (GPU memory on a GPU machine, host memory otherwise);
an entry the policy evicts from it moves to the host tier (pinned memory on a GPU machine; copies on a
side stream, the main stream waits on their event before reusing the pages), and one the policy evicts
from the host tier is dropped. A hit in the host tier is promoted back before the request runs (the
copy's event is waited on by the main stream, not the host). One policy ranks both tiers (victim_among
each tier's keys): an entry stays "in the cache" for the policy until it is dropped.

Pinning. Everything a batch looks up or stores is pinned until the batch's engine calls are done
(`with store.batch():`), so no page a running batch reads is evicted, demoted or overwritten; when every
page is pinned, an entry is not stored (stats.no_room) and the batch scores from its own K/V.
Single-threaded like KVStore: only the scheduler's worker thread touches a store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from hstu_opt.serve.kv_cache.policy import EvictionPolicy, LRUPolicy
from hstu_opt.serve.kv_cache.store import CacheStats, UserKV

DEFAULT_PAGE_ROWS = 128
DEVICE, HOST = "device", "host"


@dataclass(frozen=True)
class PageShape:
    layers: int
    page_rows: int
    heads: int
    dqk: int
    dv: int
    dtype: torch.dtype

    @property
    def page_bytes(self) -> int:
        """One page: page_rows rows of every layer's K and V."""
        return self.layers * self.page_rows * self.heads * (self.dqk + self.dv) * self.dtype.itemsize

    def pages_for(self, rows: int) -> int:
        return -(-rows // self.page_rows)


class PagePool:
    """One tier's pages and free list. CUDA pools start zeroed: the kernel's TMA loads read a user's last
    page past its rows (masked to 0 in P, but 0 * NaN would not be), so pages only ever hold finite K/V."""

    def __init__(self, shape: PageShape, num_pages: int, device: torch.device | str, host_tier: bool = False):
        self.shape, self.num_pages, self.device = shape, num_pages, torch.device(device)
        s = shape
        if host_tier:  # page-major [pages, layers, page_rows, H, d]: a page is one contiguous block, so moving
            # it to or from the GPU is one asynchronous memcpy (pinned when there is a GPU)
            kw = dict(dtype=s.dtype, pin_memory=torch.cuda.is_available())
            self.k = torch.empty(num_pages, s.layers, s.page_rows, s.heads, s.dqk, **kw)
            self.v = torch.empty(num_pages, s.layers, s.page_rows, s.heads, s.dv, **kw)
        else:  # layer-major (module docstring); (CPU: torch.empty, the reference op reads valid rows only)
            make = torch.zeros if self.device.type == "cuda" else torch.empty
            self.k = make(s.layers, num_pages, s.page_rows, s.heads, s.dqk, dtype=s.dtype, device=self.device)
            self.v = make(s.layers, num_pages, s.page_rows, s.heads, s.dv, dtype=s.dtype, device=self.device)
        self._free = list(range(num_pages - 1, -1, -1))  # popped from the end: low page ids first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        assert n <= len(self._free), "alloc past the free list (callers make room first)"
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@dataclass
class PagedEntry:
    rows: int
    pages: list[int]
    tier: str  # DEVICE | HOST


@dataclass(frozen=True)
class PagedKV:
    """A device-tier entry as the engine reads it: `pages` of `pool`, `rows` cached rows."""

    pool: PagePool
    pages: tuple[int, ...]
    rows: int

    @property
    def nbytes(self) -> int:
        return len(self.pages) * self.pool.shape.page_bytes

    def gather(self) -> UserKV:
        """The rows as contiguous per-layer tensors (tests, and a batch mixing paged and unpaged entries)."""
        idx = torch.tensor(self.pages, device=self.pool.device)
        k = self.pool.k.index_select(1, idx).flatten(1, 2)[:, :self.rows]  # [layers, rows, H, dqk]
        v = self.pool.v.index_select(1, idx).flatten(1, 2)[:, :self.rows]
        return UserKV(list(k.unbind(0)), list(v.unbind(0)))


class PagedKVStore:
    """KVStore's interface (get / put / stats) over page pools; see the module docstring."""

    def __init__(self, shape: PageShape, device_bytes: int, host_bytes: int = 0, policy: EvictionPolicy | None = None,
                 device: torch.device | str = "cpu"):
        self.shape, self.policy = shape, policy or LRUPolicy()
        self.device = torch.device(device)
        self.budget_bytes = device_bytes
        self.pool = PagePool(shape, device_bytes // shape.page_bytes, self.device)
        on_gpu = self.device.type == "cuda"
        self.host = PagePool(shape, host_bytes // shape.page_bytes, "cpu", host_tier=True) if host_bytes else None
        self._side = torch.cuda.Stream(self.device) if on_gpu else None
        self.stats = CacheStats()
        self._entries: dict[Hashable, PagedEntry] = {}
        self._pins: Counter[Hashable] = Counter()

    # ---- the runner's interface ------------------------------------------------------------------
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Pins every entry the batch gets or puts until the block ends (after the batch's engine calls)."""
        try:
            yield
        finally:
            self._pins.clear()

    def get(self, key: Hashable) -> PagedKV | None:
        """The entry in the device tier (a host-tier hit is promoted first), pinned; None on a miss, or
        when a host-tier entry cannot be promoted because every device page is pinned (a miss: prefill)."""
        e = self._entries.get(key)
        from_host = e is not None and e.tier == HOST
        if e is None or (from_host and not self._promote(key, e)):
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.host_hits += from_host
        self.policy.accessed(key)
        self._pins[key] += 1
        return self._view(e)

    def put(self, key: Hashable, kv: UserKV) -> PagedKV | None:
        """Write `kv` into device pages (one copy), evicting as the policy says; pinned. None when it cannot
        be stored (larger than the pool: stats.too_large; every other page pinned: stats.no_room)."""
        n = self.shape.pages_for(kv.rows)
        if n > self.pool.num_pages:
            self.stats.too_large += 1
            return None
        if key in self._entries:
            self._drop(key, evicted=False)  # replaced
        if not self._make_room(n, keep=key):
            self.stats.no_room += 1
            return None
        e = PagedEntry(kv.rows, self.pool.alloc(n), DEVICE)
        self._write(e, kv)
        self._entries[key] = e
        self.policy.inserted(key, n * self.shape.page_bytes)
        self.stats.inserts += 1
        self._account(e, +1)
        self._pins[key] += 1
        return self._view(e)

    def prefetch(self) -> int:
        """Promote the host-tier entries the policy wants back into *free* device pages (never evicting);
        -> how many moved. The runner calls it between batches."""
        if self.host is None or not self.policy.prefetches:  # (no O(entries) listing per batch for nothing)
            return 0
        moved = 0
        for key in self.policy.prefetch({k for k, e in self._entries.items() if e.tier == HOST}):
            e = self._entries[key]
            if len(e.pages) > self.pool.free_pages:
                continue
            self._move(key, e, DEVICE)
            self.stats.prefetches += 1
            moved += 1
        return moved

    def clear(self) -> None:
        """Drop every entry no batch pins (both tiers)."""
        for key in [k for k in self._entries if k not in self._pins]:
            self._drop(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def tier_of(self, key: Hashable) -> str | None:
        e = self._entries.get(key)
        return e.tier if e else None

    def sync(self) -> None:
        """Wait for the side stream's copies (tests; a GPU run's timing)."""
        if self._side is not None:
            self._side.synchronize()

    # ---- tiers -----------------------------------------------------------------------------------
    def _view(self, e: PagedEntry) -> PagedKV:
        return PagedKV(self.pool, tuple(e.pages), e.rows)

    def _make_room(self, n: int, keep: Hashable | None = None) -> bool:
        """Free n device pages by demoting unpinned entries the policy picks (never `keep`)."""
        while self.pool.free_pages < n:
            victims = {k for k, e in self._entries.items() if e.tier == DEVICE and k not in self._pins and k != keep}
            key = self.policy.victim_among(victims)
            if key is None:
                return False
            self._demote(key, keep)
        return True

    def _demote(self, key: Hashable, keep: Hashable | None) -> None:
        """Move `key` to the host tier (dropping the host tier's victims, never `keep`: an entry being
        promoted), or drop it when the host tier cannot take it."""
        e = self._entries[key]
        need = len(e.pages)
        host_keys = {k for k, h in self._entries.items() if h.tier == HOST and k != keep} if self.host else set()
        room = self.host.free_pages + sum(len(self._entries[k].pages) for k in host_keys) if self.host else 0
        if room < need:
            self._drop(key)
            return
        while self.host.free_pages < need:  # the host tier's own victim leaves the cache
            victim = self.policy.victim_among(host_keys)
            host_keys.remove(victim)
            self._drop(victim)
        self._move(key, e, HOST)
        self.stats.demotions += 1

    def _promote(self, key: Hashable, e: PagedEntry) -> bool:
        if not self._make_room(len(e.pages), keep=key):
            return False
        self._move(key, e, DEVICE)
        self.stats.promotions += 1
        return True

    def _move(self, key: Hashable, e: PagedEntry, tier: str) -> None:
        """Copy e's pages to the other tier, free the old ones. On a GPU the copy runs on the side stream
        after the main stream's work so far, and the main stream waits on it: freed source pages are not
        rewritten, nor promoted pages read, before the copy is done (the host never blocks)."""
        src, dst = (self.pool, self.host) if tier == HOST else (self.host, self.pool)
        copy = self._to_host if tier == HOST else self._to_device
        self._account(e, -1)
        new = dst.alloc(len(e.pages))
        if self._side is None:
            copy(e.pages, new)
        else:
            main = torch.cuda.current_stream(self.device)
            self._side.wait_stream(main)
            with torch.cuda.stream(self._side):
                copy(e.pages, new)
            main.wait_stream(self._side)
        src.release(e.pages)
        e.pages, e.tier = new, tier
        self._account(e, +1)

    def _to_host(self, pages: list[int], host_pages: list[int]) -> None:
        """Device pages -> host pages: one gather into page-major order, then one memcpy per page."""
        for a, b in ((self.pool.k, self.host.k), (self.pool.v, self.host.v)):
            moved = a.index_select(1, self._index(pages)).transpose(0, 1).contiguous()  # [n, layers, page_rows, H, d]
            for j, p in enumerate(host_pages):
                b[p].copy_(moved[j], non_blocking=True)

    def _to_device(self, host_pages: list[int], pages: list[int]) -> None:
        """Host pages -> device pages: one memcpy per page into a staging buffer, then one scatter."""
        for a, b in ((self.host.k, self.pool.k), (self.host.v, self.pool.v)):
            staged = torch.empty(len(host_pages), *a.shape[1:], dtype=a.dtype, device=b.device)
            for j, p in enumerate(host_pages):
                staged[j].copy_(a[p], non_blocking=True)
            b.index_copy_(1, self._index(pages), staged.transpose(0, 1))

    def _index(self, pages: list[int]) -> Tensor:
        return torch.tensor(pages, dtype=torch.int64).to(self.device, non_blocking=True)

    def _write(self, e: PagedEntry, kv: UserKV) -> None:
        """kv's rows -> e's pages, every layer: one index_copy per layer and tensor (the one copy from the
        prefill's output). The last page's tail keeps what it held (zeros or an old entry's finite K/V)."""
        s = self.shape
        pos = torch.arange(kv.rows, device=self.device)
        rows = self._index(e.pages)[pos // s.page_rows] * s.page_rows + pos % s.page_rows  # pool rows
        for pool, parts in ((self.pool.k, kv.keys), (self.pool.v, kv.values)):
            for layer, t in zip(pool, parts):  # layer: [pages, page_rows, H, d]
                layer.view(-1, *layer.shape[2:]).index_copy_(0, rows, t.to(pool.dtype))

    def _drop(self, key: Hashable, evicted: bool = True) -> None:
        e = self._entries.pop(key)
        self.policy.removed(key)
        (self.pool if e.tier == DEVICE else self.host).release(e.pages)
        self._account(e, -1)
        self.stats.evictions += evicted

    def _account(self, e: PagedEntry, sign: int) -> None:
        nbytes = sign * len(e.pages) * self.shape.page_bytes
        if e.tier == DEVICE:
            self.stats.bytes += nbytes
            self.stats.entries += sign
        else:
            self.stats.host_bytes += nbytes
            self.stats.host_entries += sign
