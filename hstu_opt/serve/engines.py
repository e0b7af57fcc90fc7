"""Engine adapters: one interface over the bundle's engines for the native runner, and the `auto` rule.

An adapter scores *rows*: a user's history with at most max_targets of its candidates (one padded
engine row). Every adapter runs full forwards over the padded engine contract (rank_full). Adapters
with `supports_cache` also expose the cached path (HSTU.md "M-FALCON"): prefill a user's
[contextual][history] rows once into a UserKV, then score any number of candidate rows against it
(score_cached). onnxruntime graphs are full-forward only; eager and compiled hold the PyTorch model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from hstu_opt.data.batching import PaddedBatch, fill_padded_batch, padded_batch
from hstu_opt.errors import ServeError
from hstu_opt.model.heads import l2_normalize
from hstu_opt.model.hstu import HstuModel, KVCache, PagedKVCache
from hstu_opt.model.scoring import to_tensors
from hstu_opt.ops import Impl
from hstu_opt.serve.kv_cache import PagedKV, UserKV
from hstu_opt.serve.runners.base import RankInput, RetrieveInput
from hstu_opt.serve.served_bundle import CHECKPOINT, ServedBundle

User = RankInput | RetrieveInput

ENGINE_RULE = ("auto: `compiled` on a GPU the bundle's compiled engine was built for; otherwise `eager` when the cache "
               "is on (cached scoring, prefill + score_cached, needs the PyTorch model: onnxruntime graphs are "
               "full-forward only); otherwise `onnxruntime`, int8 when the bundle's INT8 passed its accuracy gate, "
               "else fp32")


@dataclass(frozen=True)
class Row:
    """One engine row: a user and at most max_targets of its candidates."""

    user: RankInput
    candidates: np.ndarray  # [n] int64, 1 <= n <= max_targets


def padded(users: list[User], cands: list[np.ndarray], contextual_len: int, hist_width: int | None = None,
           cand_width: int | None = None) -> PaddedBatch:
    """The engine contract for these users: history and candidates right-padded to the batch's longest
    (or to the widths given)."""
    ctx = (np.stack([u.contextual_ids for u in users]) if contextual_len
           else np.zeros((len(users), 0), np.int64))  # [B, C]
    return padded_batch(_hist(users), cands, _query_times(users), ctx, hist_width, cand_width)


def fill_padded(views: dict[str, np.ndarray], users: list[User], cands: list[np.ndarray]) -> dict[str, np.ndarray]:
    """padded()'s batch written in place into `views`, an engine's own input arrays of the padded widths
    (CompiledRunner.feed_buffers: its staging buffer, so run() copies nothing). -> views."""
    ctx = np.stack([u.contextual_ids for u in users]) if "contextual_ids" in views else None  # [B, C]
    return fill_padded_batch(views, _hist(users), cands, _query_times(users), ctx)


def _hist(users: list[User]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [(u.item_ids, u.ratings, u.timestamps) for u in users]


def _query_times(users: list[User]) -> np.ndarray:
    return np.array([u.query_time for u in users], np.int64)


def split_padded(probs: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """[B, Nc, T] with row b's first counts[b] slots real -> one [counts[b], T] array per row."""
    return [np.ascontiguousarray(probs[b, :n], dtype=np.float32) for b, n in enumerate(counts)]


class EngineAdapter(ABC):
    name: str  # the engine label clients see: "eager", "onnxruntime.int8", "compiled", ...
    supports_cache: bool = False
    # with the cache off: score a user's candidate groups against one prefill (True), or run a full
    # forward per group (False: the compiled engine, whose compiled graph is the fast path)
    groups_via_prefill: bool = False
    score_graphs_enabled: bool = False  # cache hits replay a CUDA graph per number of candidate groups

    def __init__(self, max_rows: int, contextual_len: int):
        self.max_rows = max_rows  # padded rows one engine call takes
        self.contextual_len = contextual_len

    @abstractmethod
    def rank_full(self, rows: list[Row]) -> list[np.ndarray]:
        """Full forward per row -> probabilities [n_i, T] per row (len(rows) <= max_rows)."""

    @abstractmethod
    def retrieve(self, users: list[RetrieveInput]) -> np.ndarray:
        """Query embeddings [B, D] float32, L2-normalized."""

    def prefill(self, users: list[RankInput]) -> list[UserKV]:
        raise NotImplementedError(f"engine {self.name} has no cached path (supports_cache is False)")

    def score_cached(self, kvs: list[UserKV], cands: list[np.ndarray]) -> list[np.ndarray]:
        """Row i: candidates cands[i] (at most max_targets) against kvs[i] -> [n_i, T]."""
        raise NotImplementedError(f"engine {self.name} has no cached path (supports_cache is False)")

    def replays(self, rows: list[Row]) -> bool:
        """Whether rank_full(rows) would only replay a captured CUDA graph (inline_lone's auto rule)."""
        return False

    def prefill_size(self, users: list[RankInput]) -> int:
        """How many of these users (a batch's cache misses) one prefill call should take."""
        return self.max_rows

    def capture_prefill_graphs(self) -> None:
        """Capture what makes a cache miss's prefill a graph replay, where the engine has such a thing."""

    def hit_replays(self, groups: int) -> bool:
        """Whether score_cached of `groups` candidate groups, every entry in the device page pool, would only
        replay a captured CUDA graph."""
        return False

    def warm_up(self) -> None:
        """One smallest request through every path, so the first real request finds everything loaded."""
        one = np.ones(1, np.int64)
        ctx = np.ones(self.contextual_len, np.int64) if self.contextual_len else None
        user = RankInput(None, one, one * 0, one * 0, one, 0, ctx, False)
        self.rank_full([Row(user, one)])
        self.retrieve([RetrieveInput(None, one, one * 0, one * 0, 0, ctx, False)])
        if self.supports_cache:
            self.score_cached(self.prefill([user]), [one])


# A batch with at most this many cache misses prefills them one by one through the prefill graphs instead of
# in one eager call. An eager prefill is bound by its op launches, so n users take at least a lone user's eager
# time: 6.13 ms for 4,100 rows on the H100 against 0.79 ms a replay (gpu_hit_profile_h100_2026-12-05_run89.json,
# miss_prefill); n replays win while n x 0.79 < 6.13, n <= 7 at the longest history (shorter histories replay
# smaller buckets, the eager launches stay). Timed both ways in H100 run 91 (gpu_hit_profile_h100_2026-12-05_
# run91.json, miss_batches; 4100-row users, back to back): n replays / one eager call of n = 0.20 at n = 2, 0.44
# at 4, 0.98 at 7, 0.97 at 8, 1.76 at 16.
GRAPH_PREFILL_USERS = 7


class TorchAdapter(EngineAdapter):
    """The PyTorch model: full forwards (model.rank), the cached path, and retrieval from the jagged trunk."""

    supports_cache = True
    groups_via_prefill = True

    def __init__(self, model: HstuModel, name: str, max_rows: int):
        super().__init__(max_rows, model.cfg.contextual_len)
        self.model, self.name = model.eval(), name
        self.device = next(model.parameters()).device
        # cache hits on a GPU: CUDA-graph replays over the page pool (serve/graphs.py), made on first use
        self.score_graphs_enabled = self.device.type == "cuda"
        self.score_graphs = None
        self.prefill_graphs = None  # a lone miss's prefill as graph replays (capture_prefill_graphs)

    @torch.no_grad()
    def rank_full(self, rows: list[Row]) -> list[np.ndarray]:
        batch = padded([r.user for r in rows], [r.candidates for r in rows], self.contextual_len)
        probs = self.model.rank(**to_tensors(batch.ranking_feed(), self.device))  # [B, Nc, T]
        return split_padded(probs.float().cpu().numpy(), [len(r.candidates) for r in rows])

    def _user_rows(self, u: User) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A user's [contextual][history] rows: ids, ratings, timestamps (contextual rows: rating 0, the query time)."""
        C = self.contextual_len
        ctx = u.contextual_ids if C else np.zeros(0, np.int64)
        return (np.r_[ctx, u.item_ids], np.r_[np.zeros(C, np.int64), u.ratings],
                np.r_[np.full(C, u.query_time, np.int64), u.timestamps])

    def _jagged(self, users: list[User]) -> tuple[torch.Tensor, ...]:
        """[contextual][history] rows per user (_user_rows), as jagged tensors."""
        parts = [self._user_rows(u) for u in users]
        ids, ratings, ts = (torch.from_numpy(np.concatenate(p).astype(np.int64)).to(self.device) for p in zip(*parts))
        offsets = torch.tensor(np.r_[0, np.cumsum([len(p[0]) for p in parts])], dtype=torch.int64, device=self.device)
        qt = torch.tensor([u.query_time for u in users], dtype=torch.int64, device=self.device)
        return ids, ratings, ts, offsets, qt  # [L], [L], [L], [B+1], [B]

    def capture_prefill_graphs(self) -> None:
        """On a GPU, capture a lone miss's prefill per row bucket (serve/graphs.PrefillGraphs; the runner asks
        when requests take the cached path)."""
        if self.device.type != "cuda":
            return
        from hstu_opt.serve.graphs import PrefillGraphs

        cfg = self.model.cfg
        self.prefill_graphs = PrefillGraphs(self.model, cfg.contextual_len + cfg.max_history_len)
        self.prefill_graphs.capture()

    def prefill_size(self, users: list[RankInput]) -> int:
        """1 (each miss a graph replay) for up to GRAPH_PREFILL_USERS misses whose row buckets are all captured;
        otherwise one eager call for as many as an engine call takes."""
        graphs = self.prefill_graphs
        if (graphs is not None and len(users) <= GRAPH_PREFILL_USERS
                and all(graphs.ready(self.contextual_len + len(u.item_ids)) for u in users)):
            return 1
        return self.max_rows

    @torch.no_grad()
    def prefill(self, users: list[RankInput]) -> list[UserKV]:
        """Each user's K/V. A lone user with prefill graphs: a replay, its K/V borrowed (UserKV.owned)."""
        if len(users) == 1 and self.prefill_graphs is not None:
            kv = self.prefill_graphs.run(*self._user_rows(users[0]), users[0].query_time)
            if kv is not None:
                return [kv]
        cache = self.model.prefill(*self._jagged(users))
        bounds = cache.offsets.tolist()
        # views of the batch's K/V: the paged store copies them into its pages at once (the one copy), and
        # an entry it had no room for lives only as long as the batch
        return [UserKV([k[s:e] for k in cache.keys], [v[s:e] for v in cache.values])
                for s, e in zip(bounds[:-1], bounds[1:])]

    @torch.no_grad()
    def score_cached(self, kvs: list[UserKV | PagedKV], cands: list[np.ndarray]) -> list[np.ndarray]:
        """Entries all in the page pool are read in place through their page tables (no K/V copy); otherwise
        (the cache off, or a batch with an entry the pool had no room for) the rows are concatenated."""
        if all(isinstance(kv, PagedKV) for kv in kvs):
            if (out := self._graphed(kvs, cands)) is not None:
                return out
            cache = self._paged(kvs)
        else:
            kvs = [kv.gather() if isinstance(kv, PagedKV) else kv for kv in kvs]
            layers = range(len(kvs[0].keys))
            keys = [torch.cat([kv.keys[i] for kv in kvs]) for i in layers]  # each [sum Lc, H, dqk]
            values = [torch.cat([kv.values[i] for kv in kvs]) for i in layers]
            cache = KVCache(keys, values, self._offsets([kv.rows for kv in kvs]),
                            torch.zeros(len(kvs), dtype=torch.int64, device=self.device))
        counts = [len(c) for c in cands]
        cand = torch.from_numpy(np.concatenate(cands)).to(self.device)  # [Ld]
        probs = self.model.score_cached(cache, cand, self._offsets(counts)).float().cpu().numpy()  # [Ld, T]
        return np.split(probs, np.cumsum(counts)[:-1])

    def hit_replays(self, groups: int) -> bool:
        return self.score_graphs is not None and self.score_graphs.captured(groups)

    def _graphed(self, kvs: list[PagedKV], cands: list[np.ndarray]) -> list[np.ndarray] | None:
        if not self.score_graphs_enabled:
            return None
        if self.score_graphs is None:
            from hstu_opt.serve.graphs import PagedScoreGraphs

            pool, cfg = kvs[0].pool, self.model.cfg
            self.score_graphs = PagedScoreGraphs(self.model, pool.k, pool.v,
                                                 pool.shape.pages_for(cfg.contextual_len + cfg.max_history_len))
        pages = [kv.pages for kv in kvs]
        if kvs[0].pool.k is not self.score_graphs.k_pages or not self.score_graphs.covers(pages, [len(c) for c in cands]):
            return None
        return self.score_graphs.run(pages, [kv.rows for kv in kvs], cands)

    def _paged(self, kvs: list[PagedKV]) -> PagedKVCache:
        pool = kvs[0].pool
        assert all(kv.pool is pool for kv in kvs), "one page pool per engine"
        table = np.zeros((len(kvs), max(len(kv.pages) for kv in kvs)), np.int32)  # [B, max_pages]
        for b, kv in enumerate(kvs):
            table[b, :len(kv.pages)] = kv.pages
        lengths = torch.tensor([kv.rows for kv in kvs], dtype=torch.int64)
        return PagedKVCache(pool.k, pool.v, torch.from_numpy(table).to(self.device, non_blocking=True),
                            lengths.to(self.device, non_blocking=True))

    def _offsets(self, counts: list[int]) -> torch.Tensor:
        return torch.tensor(np.r_[0, np.cumsum(counts)], dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def retrieve(self, users: list[RetrieveInput]) -> np.ndarray:
        ids, ratings, ts, offsets, qt = self._jagged(users)
        states, _ = self.model.forward_jagged(ids, ratings, ts, offsets, torch.zeros_like(qt), qt)  # [L, D]
        return l2_normalize(states[offsets[1:] - 1].float()).cpu().numpy()  # the last history row per user


class OrtAdapter(EngineAdapter):
    """The bundle's onnxruntime engines (ranking + retrieval, one precision): full forwards only."""

    def __init__(self, bundle: ServedBundle, precision: str):
        from hstu_opt.backends import onnxruntime as ort_backend

        super().__init__(bundle.engine_max_batch, bundle.cfg.contextual_len)
        self.name = f"onnxruntime.{precision}"
        self._run = ort_backend.run
        self.ranking = ort_backend.load(bundle.ort_session_dir("ranking", precision), f"ranking.{precision}")
        self.retrieval = ort_backend.load(bundle.ort_session_dir("retrieval", precision), f"retrieval.{precision}")

    def rank_full(self, rows: list[Row]) -> list[np.ndarray]:
        batch = padded([r.user for r in rows], [r.candidates for r in rows], self.contextual_len)
        probs = self._run(self.ranking, batch.ranking_feed())["probs"]
        return split_padded(probs, [len(r.candidates) for r in rows])

    def retrieve(self, users: list[RetrieveInput]) -> np.ndarray:
        batch = padded(users, [np.zeros(0, np.int64)] * len(users), self.contextual_len)
        return self._run(self.retrieval, batch.retrieval_feed())["query_embedding"].astype(np.float32)


class CompiledAdapter(TorchAdapter):
    """The bundle's compiled engine for full forwards; its model (Triton ops on a GPU) for the cached
    path and retrieval, which the compiled graph does not cover."""

    groups_via_prefill = False

    def __init__(self, bundle: ServedBundle):
        from hstu_opt.backends.compiled import CompiledRunner

        self.runner = CompiledRunner(bundle.compiled_dir())  # loads the shipped artifacts and warms up
        limits = self.runner.meta["limits"]
        super().__init__(self.runner.model, "compiled", limits["batch"][1])
        self.widths = limits["history"][1], limits["candidates"][1]

    def warm_up(self) -> None:
        """Also one full-width batch of every size up to max_rows: the compiled graphs take the batch as a
        dynamic dim, but each new size records its own CUDA graph, which cost 0.5-2 s in the middle of
        requests on the H200 (c=16 p99 1.9 s, serve_load_dlrm-v3_h200_2026-12-04_run70). Real rows of other
        lengths record on their second sight (the engine's graphs are keyed by the batch's total rows, in
        512-row buckets: compiled.bucket_rows)."""
        super().warm_up()
        h, c = self.widths
        one = np.ones(h, np.int64)
        ctx = np.ones(self.contextual_len, np.int64) if self.contextual_len else None
        user = RankInput(None, one, one, np.arange(h, dtype=np.int64), np.ones(c, np.int64), h, ctx, False)
        for b in range(1, self.max_rows + 1):
            self.rank_full([Row(user, user.candidates)] * b)

    def replays(self, rows: list[Row]) -> bool:
        h, c = self.widths
        key = self.runner.graph_key(len(rows), h, c, sum(len(r.user.item_ids) for r in rows),
                                    sum(len(r.candidates) for r in rows))
        return self.runner.replays(key)

    def rank_full(self, rows: list[Row]) -> list[np.ndarray]:
        # padded to the engine's full widths: only the batch size and the real row counts vary, which
        # the warmed graphs already take as dynamic; a new padded width would compile again (seconds
        # on a CPU) in the middle of a request. (The jagged rows it computes are the real ones.)
        # written straight into the runner's staging buffer (zero-copy input: run() stages nothing; the H200
        # timed 0.87 against 0.90 ms at batch 1, gpu_hstu_2026-11-30_run67_engine.log)
        feed = fill_padded(self.runner.feed_buffers(len(rows), *self.widths), [r.user for r in rows],
                           [r.candidates for r in rows])
        probs = self.runner.run(feed)["probs"]
        return split_padded(probs, [len(r.candidates) for r in rows])


def uses_cached_path(adapter: EngineAdapter, cache_on: bool) -> bool:
    """Whether ranking goes through prefill + score_cached (else a full forward per candidate group)."""
    return adapter.supports_cache and (cache_on or adapter.groups_via_prefill)


@dataclass(frozen=True)
class EngineChoice:
    engine: str  # "eager" | "onnxruntime" | "compiled"
    precision: str | None  # onnxruntime's "fp32" | "int8"
    reason: str

    @property
    def label(self) -> str:
        return f"{self.engine}.{self.precision}" if self.precision else self.engine


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def choose_engine(bundle: ServedBundle, requested: str, cache_on: bool, gpu: str | None) -> EngineChoice:
    """The engine to serve: `requested`, checked against the bundle, or the ENGINE_RULE for "auto"."""
    if requested == "auto":
        return _auto(bundle, cache_on, gpu)
    if requested == "compiled":
        if bundle.compiled_dir() is None:
            raise ServeError(f"{bundle.path}: --engine compiled, but the bundle has no compiled engine (it has "
                             f"{', '.join(bundle.engines())}): add 'compiled' to engine.backends and rebuild")
        return EngineChoice("compiled", None, "asked for (--engine compiled)")
    if requested == "onnxruntime":
        return _onnxruntime(bundle, "asked for (--engine onnxruntime)")
    if requested == "eager":
        return EngineChoice("eager", None, "asked for (--engine eager)")
    raise ServeError(f"--engine {requested!r}: choose auto, compiled, onnxruntime or eager")


def _auto(bundle: ServedBundle, cache_on: bool, gpu: str | None) -> EngineChoice:
    meta = bundle.compiled_meta()
    if gpu and meta and meta["device"] == "cuda" and meta["gpu"] == gpu:
        return EngineChoice("compiled", None, f"auto: the bundle's compiled engine was built for this GPU ({gpu})")
    where = f"GPU {gpu} (the bundle has no compiled engine built for it)" if gpu else "a CPU machine"
    if cache_on:
        return EngineChoice("eager", None, f"auto: {where} with the cache on: cached scoring (prefill + score_cached) "
                                           "needs the PyTorch model; onnxruntime graphs are full-forward only")
    return _onnxruntime(bundle, f"auto: {where} with the cache off")


def _onnxruntime(bundle: ServedBundle, why: str) -> EngineChoice:
    if bundle.ort_session_dir("ranking", "fp32") is None:
        raise ServeError(f"{bundle.path}: no onnxruntime engine in the bundle (it has {', '.join(bundle.engines())}): "
                         "add 'onnxruntime' to engine.backends and rebuild, or pass --engine eager")
    if bundle.int8_passed() and bundle.ort_session_dir("ranking", "int8") and bundle.ort_session_dir("retrieval", "int8"):
        return EngineChoice("onnxruntime", "int8", f"{why}; int8 because the bundle's INT8 passed its accuracy gate")
    return EngineChoice("onnxruntime", "fp32", f"{why}; fp32 because the bundle has no INT8 engine that passed its "
                                               "accuracy gate")


def adapter_class(choice: EngineChoice) -> type[EngineAdapter]:
    return {"onnxruntime": OrtAdapter, "compiled": CompiledAdapter, "eager": TorchAdapter}[choice.engine]


def load_adapter(bundle: ServedBundle, choice: EngineChoice) -> EngineAdapter:
    if choice.engine == "onnxruntime":
        return OrtAdapter(bundle, choice.precision)
    if choice.engine == "compiled":
        return CompiledAdapter(bundle)
    return TorchAdapter(eager_model(bundle), "eager", bundle.engine_max_batch)


def eager_model(bundle: ServedBundle) -> HstuModel:
    """The checkpoint's model: reference ops on a CPU, Triton ops on a CUDA GPU, in the recipe's dtype."""
    from hstu_opt.model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(bundle.path / CHECKPOINT)
    if torch.cuda.is_available():
        model.impl = Impl.TRITON
        return model.to("cuda", model.cfg.torch_dtype).eval()
    return model.to(model.cfg.torch_dtype).eval()
