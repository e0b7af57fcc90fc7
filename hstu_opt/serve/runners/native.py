"""The native runner: scheduler (batching) + engine adapter + user cache, all in this process.

Ranking, per batch (on the scheduler's worker thread):
  * engines with the cached path (eager, compiled) and the cache on: look every user up in the
    cache; prefill the misses once (one entry per distinct key), then score every candidate group
    (max_targets candidates each) against its user's K/V. A hit and a miss take the same scoring
    path on the same K/V, so they return the same scores. With the cache off, eager runs the same
    path without storing (groups_via_prefill).
  * otherwise (onnxruntime; compiled with the cache off): one padded row per (user, candidate group)
    through the engine's full forward.
Engine calls carry at most the engine's max rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future

import numpy as np

from hstu_opt.serve.engines import (ENGINE_RULE, GRAPH_PREFILL_USERS, EngineAdapter, EngineChoice, Row, adapter_class,
                                    load_adapter, uses_cached_path)
from hstu_opt.serve.kv_cache import (DEFAULT_PAGE_ROWS, CacheStats, EvictionPolicy, PagedKV, PagedKVStore, PageShape,
                                     UserKV, cache_key, history_ref, make_policy)
from hstu_opt.serve.kv_cache.paged import DEVICE
from hstu_opt.serve.runners.base import HistoryRefGone, RankInput, RankOutput, RetrieveInput, Runner
from hstu_opt.serve.scheduler import BatchPolicy, Job, Scheduler
from hstu_opt.serve.served_bundle import ServedBundle

RANK, RETRIEVE = "rank", "retrieve"
GONE = "gone"  # the cache status of a history_ref the cache no longer holds
HISTORY_REF_GONE = ("history_ref: the cache no longer holds this history (evicted, or the server restarted): "
                    "send the history")


def length_class(n: int) -> int:
    """Histories of n rows share a batch with those of the same power-of-two class (padding waste < 2x)."""
    return int(n).bit_length()


def groups(candidates: np.ndarray, size: int) -> list[np.ndarray]:
    return [candidates[i:i + size] for i in range(0, len(candidates), size)]


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def ms(t0: float, t1: float) -> float:
    return round((t1 - t0) * 1e3, 3)


INLINE_RULE = ("auto: a lone request whose engine call is only a CUDA-graph replay (a full forward of a size the "
               "compiled engine has captured; a history_ref hit in the device pool with its graph captured): under "
               "a millisecond (H200 runs 82, 84); anything else (a first-seen size, a miss's prefill, retrieval, "
               "a CPU engine) goes through the worker, so the event loop never waits on a long call")
ALWAYS, NEVER, REPLAYS = "always", "never", "replays"  # inline_rule's modes


def inline_rule(batching: BatchPolicy) -> tuple[str, str]:
    """Which lone requests run on the event loop's thread (ALWAYS / NEVER / REPLAYS), and why."""
    if batching.max_wait_s > 0:
        return NEVER, "off: --max-wait-ms > 0 (every request waits for its batch to fill)"
    if batching.inline_lone is not None:
        return (ALWAYS, "on: --inline-lone") if batching.inline_lone else (NEVER, "off: --no-inline-lone")
    return REPLAYS, INLINE_RULE


class NativeRunner(Runner):
    name = "native"

    def __init__(self, bundle: ServedBundle, choice: EngineChoice, cache_bytes: int, batching: BatchPolicy,
                 on_batch: Callable[[str, int], None] | None = None, on_depth: Callable[[int], None] | None = None,
                 cache_policy: str = "predictive", host_cache_bytes: int | None = None,
                 page_rows: int = DEFAULT_PAGE_ROWS, alone: Callable[[], bool] | None = None, prefetch_s: float = 0.0):
        """alone: whether the request asking is the only one the server is handling (the HTTP layer's
        count); with batching.inline_lone (and no max_wait), such a request runs on the event loop's
        thread when the engine is idle (Scheduler.run_now)."""
        self.bundle, self.choice, self.batching = bundle, choice, batching
        self.engine = choice.label
        self.cache_bytes = cache_bytes
        cache_on = cache_bytes > 0 and adapter_class(choice).supports_cache
        self.store = (paged_store(bundle, cache_bytes, cache_bytes if host_cache_bytes is None else host_cache_bytes,
                                  make_policy(cache_policy, prefetch_s), page_rows) if cache_on else None)
        self.adapter: EngineAdapter | None = None
        self.max_targets = bundle.cfg.max_targets
        self.inline, self.inline_reason = inline_rule(batching)
        self._alone = alone if self.inline != NEVER else None
        self._ready = False
        report = on_batch or (lambda kind, size: None)
        self.scheduler = Scheduler(self._execute, batching, on_batch=lambda bucket, size: report(bucket[0], size),
                                   on_depth=on_depth)

    # ---- Runner -------------------------------------------------------------------------------
    async def start(self) -> None:
        self.adapter = await asyncio.to_thread(self._load)
        self.scheduler.start()
        self._ready = True

    def _load(self) -> EngineAdapter:
        adapter = load_adapter(self.bundle, self.choice)
        adapter.warm_up()
        if uses_cached_path(adapter, self.store is not None):
            adapter.capture_prefill_graphs()  # (GPU only: a lone miss's prefill as a graph replay)
        if self.store is not None and uses_cached_path(adapter, True):
            self._warm_up_pages(adapter)
        return adapter

    def _warm_up_pages(self, adapter: EngineAdapter) -> None:
        """One entry through the page pool and the paged kernel (its first launch compiles it), then gone:
        the first real hit must not pay for that. Where hits replay CUDA graphs (a GPU), every number of
        candidate groups an engine call holds is scored once, so each graph is captured here and not by the
        first batch of its size, in the middle of traffic. The cache starts empty, its counters at zero."""
        one = np.ones(1, np.int64)
        ctx = np.ones(adapter.contextual_len, np.int64) if adapter.contextual_len else None
        user = RankInput(None, one, one * 0, one * 0, one, 0, ctx, False)
        with self.store.batch():
            kv = self.store.put((None, "warm-up", 0), adapter.prefill([user])[0])
            if kv is not None:
                for groups in range(1, (adapter.max_rows if adapter.score_graphs_enabled else 1) + 1):
                    adapter.score_cached([kv] * groups, [one] * groups)
        self.store.clear()
        self.store.stats = CacheStats()

    def draining(self) -> None:
        self.scheduler.flush()

    async def stop(self) -> None:
        self._ready = False
        self.scheduler.close()
        await asyncio.to_thread(self.scheduler.join)

    async def rank(self, req: RankInput) -> RankOutput:
        return await self._submit((RANK, length_class(len(req.item_ids))), req)

    async def retrieve(self, req: RetrieveInput) -> np.ndarray:
        return await self._submit((RETRIEVE, length_class(len(req.item_ids))), req)

    async def _submit(self, bucket: Hashable, payload) -> object:
        result = await self._run(bucket, payload)
        if isinstance(result, HistoryRefGone):  # (a result, not the batch's failure: the others stand)
            raise result
        return result

    async def _run(self, bucket: Hashable, payload) -> object:
        if self._alone is not None and self._alone() and (self.inline == ALWAYS or self._replays(bucket, payload)):
            await asyncio.sleep(0)  # requests that arrived with this one start first, and count
            done = self.scheduler.run_now(bucket, payload) if self._alone() else None
            if done is not None:
                return done.result()
        future: Future = self.scheduler.submit(bucket, payload)  # QueueFull / SchedulerClosed
        return await asyncio.wrap_future(future)

    def _replays(self, bucket: Hashable, u: RankInput) -> bool:
        """Whether this request's engine work is only CUDA-graph replays (the auto rule's test)."""
        if bucket[0] != RANK or self.adapter is None:
            return False
        if uses_cached_path(self.adapter, self.store is not None):  # a hit by reference, already on the device
            return (self.store is not None and u.ref is not None and self.store.tier_of(u.ref) == DEVICE
                    and self.adapter.hit_replays(len(groups(u.candidates, self.max_targets))))
        rows = [r for _, r in self._full_rows([u])]
        return all(self.adapter.replays(chunk) for chunk in chunks(rows, self.adapter.max_rows))

    def ready(self) -> bool:
        return self._ready

    def history_refs(self) -> bool:
        return self.store is not None

    def cache_stats(self) -> CacheStats | None:
        return self.store.stats if self.store else None

    def describe(self) -> dict:
        return {"runner": self.name, "engine": self.engine, "engine_reason": self.choice.reason,
                "engine_rule": ENGINE_RULE, "cache": self._describe_cache(),
                "batching": {"max_batch": self.batching.max_batch, "max_wait_ms": self.batching.max_wait_s * 1e3,
                             "max_queue": self.batching.max_queue, "inline_lone": self.inline,
                             "inline_lone_reason": self.inline_reason,
                             "engine_max_rows": self.bundle.engine_max_batch,
                             "candidate_group": self.max_targets}}

    def _describe_cache(self) -> dict:
        if self.store is not None:
            st = self.store
            return {"enabled": True, "budget_bytes": self.cache_bytes, "policy": type(st.policy).__name__,
                    "prefetch_s": getattr(st.policy, "prefetch_s", 0.0),
                    "pool": f"{st.pool.num_pages} pages on {st.pool.device.type}", "page_rows": st.shape.page_rows,
                    "prefill_graphs": self._prefill_graphs(),
                    "host_pages": st.host.num_pages if st.host else 0,
                    "key": "(user_id, sha256 of history rows and contextual ids, floored query time)"}
        why = ("--cache-gb 0" if self.cache_bytes <= 0
               else f"engine {self.engine} has no cached path (full-forward graphs only)")
        return {"enabled": False, "why": why}

    def _prefill_graphs(self) -> str:
        graphs = getattr(self.adapter, "prefill_graphs", None)
        if graphs is not None:
            return (f"a miss's prefill replays a CUDA graph per row bucket (each of a batch's misses, up to "
                    f"{GRAPH_PREFILL_USERS}; more prefill eagerly in one call): {graphs.describe()}")
        return "none: misses prefill eagerly (prefill graphs are captured on a GPU)"

    # ---- the worker thread --------------------------------------------------------------------
    def _execute(self, bucket: Hashable, jobs: list[Job]) -> list:
        if bucket[0] == RETRIEVE:
            return self._retrieve_batch([j.payload for j in jobs])
        t0 = time.perf_counter()
        users = [j.payload for j in jobs]
        refs: list[str | None] = [None] * len(users)
        if uses_cached_path(self.adapter, self.store is not None):
            probs, status, phases, refs = self._rank_cached(users)
        else:
            probs, status, phases = self._rank_full(users), ["off"] * len(users), {}
        t1 = time.perf_counter()
        batch_ms = ms(t0, t1)
        return [RankOutput(p, s, {"queue": ms(j.enqueued, j.started), "batch": batch_ms, **phases}, finished=t1,
                           history_ref=r) if s != GONE else HistoryRefGone(HISTORY_REF_GONE)
                for j, p, s, r in zip(jobs, probs, status, refs)]

    def _full_rows(self, users: list[RankInput]) -> list[tuple[int, Row]]:
        """(user index, engine row) per candidate group: what full forwards run, max_rows at a time."""
        return [(i, Row(u, g)) for i, u in enumerate(users) for g in groups(u.candidates, self.max_targets)]

    def _rank_full(self, users: list[RankInput]) -> list[np.ndarray]:
        rows = self._full_rows(users)
        out = []
        for chunk in chunks(rows, self.adapter.max_rows):
            out += self.adapter.rank_full([r for _, r in chunk])
        return self._per_user(len(users), [i for i, _ in rows], out)

    def _rank_cached(self, users: list[RankInput]) -> tuple[list[np.ndarray], list[str], dict[str, float], list]:
        """(probs, cache status, phases, history_ref tokens) per user; a user whose history_ref names no
        entry gets status GONE and no scores."""
        t0 = time.perf_counter()
        with self.store.batch() if self.store is not None else contextlib.nullcontext():  # pins the batch's pages
            kvs, status, keys = self._user_kvs(users)
            t1 = time.perf_counter()
            rows = [(i, g) for i, u in enumerate(users) if kvs[i] is not None
                    for g in groups(u.candidates, self.max_targets)]
            out = []
            for chunk in chunks(rows, self.adapter.max_rows):
                out += self.adapter.score_cached([kvs[i] for i, _ in chunk], [g for _, g in chunk])
        t2 = time.perf_counter()
        if self.store is not None:
            self.store.prefetch()  # host-tier users the policy expects back soon, into free pages
        refs = [history_ref(k, u.truncated) if k is not None else None for k, u in zip(keys, users)]
        return (self._per_user(len(users), [i for i, _ in rows], out), status,
                {"prefill": ms(t0, t1), "score": ms(t1, t2)}, refs)

    def _user_kvs(self, users: list[RankInput]) -> tuple[list, list[str], list]:
        """Each user's K/V: from the cache, or prefilled (once per distinct key in the batch) and stored;
        None for a history_ref the cache no longer holds (status GONE). Also each user's cache key where
        the entry is now cached (None where it is not: cache off, or no room to store it)."""
        kvs: list[UserKV | PagedKV | None] = [None] * len(users)
        status = ["off"] * len(users)
        cached: list = [None] * len(users)
        todo: dict[Hashable, list[int]] = {}  # key -> the users needing that prefill
        for i, u in enumerate(users):
            key = cache_key(u) if self.store is not None else i
            kv = self.store.get(key) if self.store is not None else None
            if self.store is not None:
                status[i] = "hit" if kv is not None else (GONE if u.ref is not None else "miss")
                cached[i] = key if kv is not None else None
            if kv is None and u.ref is None:
                todo.setdefault(key, []).append(i)
            kvs[i] = kv
        pending = list(todo.items())
        misses = [users[idx[0]] for _, idx in pending]  # one user per distinct key
        size = self.adapter.prefill_size(misses)  # (1: graph replays, each K/V stored before the next overwrites it)
        for chunk, group in zip(chunks(pending, size), chunks(misses, size)):
            for (key, idx), kv in zip(chunk, self.adapter.prefill(group)):
                stored = self.store.put(key, kv) if self.store is not None else None  # the entry in pages
                kv = stored or kv.owned()  # (not stored: kept for this batch's scoring, past the next prefill)
                for i in idx:
                    kvs[i], cached[i] = kv, key if stored is not None else None
        return kvs, status, cached

    @staticmethod
    def _per_user(n: int, owner: list[int], outputs: list[np.ndarray]) -> list[np.ndarray]:
        """Row outputs (in row order, grouped by user, candidate order kept) -> [M_u, T] per user."""
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for i, o in zip(owner, outputs):
            parts[i].append(o)
        return [np.concatenate(p).astype(np.float32, copy=False) if p else np.zeros((0, 0), np.float32)
                for p in parts]  # (no rows: a history_ref that was gone)

    def _retrieve_batch(self, users: list[RetrieveInput]) -> list[np.ndarray]:
        out = []
        for chunk in chunks(users, self.adapter.max_rows):
            out += list(self.adapter.retrieve(chunk))  # [D] each
        return out


def paged_store(bundle: ServedBundle, device_bytes: int, host_bytes: int, policy: EvictionPolicy,
                page_rows: int) -> PagedKVStore:
    """The cache's page pools, shaped by the bundle's model, where eager_model puts it (CUDA when there is one)."""
    import torch

    cfg = bundle.cfg
    shape = PageShape(cfg.num_layers, page_rows, cfg.num_heads, cfg.attention_dim, cfg.linear_dim, cfg.torch_dtype)
    return PagedKVStore(shape, device_bytes, host_bytes, policy, "cuda" if torch.cuda.is_available() else "cpu")
