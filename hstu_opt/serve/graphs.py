"""Cache hits as CUDA-graph replays: model.score_cached over the page pool, captured once per batch size.

A hit's work is small (256 candidates through 5 layers is about 20 kernels of tens of microseconds) and,
run eagerly, the Python around each op costs more than the op: the eager path took milliseconds where the
GPU needed a fraction of one. The paged cache makes the hit path capturable: the pool's tensors never
move, so a graph can read any user's K/V in place through a page table that is just data.

One graph per number of user groups B (1..max_rows). Every group is padded to max_targets candidates
(item 1 in the unused slots): targets never attend to each other (HSTU.md), so padding rows change no real
row's score, and the candidates' jagged offsets are fixed (b * max_targets). Page tables are padded to
the pages of the longest history the model takes. A replay stages candidate ids, page table and cache
lengths in one page-locked host buffer, copies it in, runs the captured ops and copies the probabilities
out, all inside the graph: one launch and one wait.

Only the paged Triton route is captured (CUDA, every entry in the device pool). If capturing fails (an op
the router sends to a path that syncs with the host, say), the scorer says so once and the adapter keeps
running that batch size eagerly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from hstu_opt.backends.compiled import host_buffer
from hstu_opt.model.hstu import HstuModel, KVCache, PagedKVCache
from hstu_opt.model.layout import ROW_BUCKET, bucket_rows, row_buckets
from hstu_opt.serve.kv_cache import UserKV

log = logging.getLogger("hstu_opt.serve")
PAD_ITEM = 1  # candidate id in unused slots (any valid id: those rows are computed and dropped)


class PagedScoreGraphs:
    def __init__(self, model: HstuModel, k_pages: torch.Tensor, v_pages: torch.Tensor, max_pages: int):
        self.model, self.k_pages, self.v_pages = model, k_pages, v_pages
        self.T, self.P = model.cfg.max_targets, max_pages
        self.device = k_pages.device
        self._graphs: dict[int, _Capture | None] = {}  # None: capture failed, run eagerly
        self._mempool = torch.cuda.graph_pool_handle()
        self.replays = 0

    def captured(self, B: int) -> bool:
        """Whether B user groups have a captured graph (the next such batch is a replay, not a capture)."""
        return self._graphs.get(B) is not None

    def covers(self, pages: Sequence[Sequence[int]], counts: Sequence[int]) -> bool:
        return (self._graphs.get(len(counts), True) is not None and max(counts) <= self.T
                and max(len(p) for p in pages) <= self.P)

    def run(self, pages: Sequence[Sequence[int]], rows: Sequence[int], cands: Sequence[np.ndarray]) -> list[np.ndarray] | None:
        """Per group: probabilities [len(cands[b]), tasks]; None when this batch size cannot be captured."""
        B = len(cands)
        if B not in self._graphs:
            self._graphs[B] = self._capture(B)
        cap = self._graphs[B]
        if cap is None:
            return None
        cap.stage(pages, rows, cands)
        cap.graph.replay()
        torch.cuda.current_stream().synchronize()
        self.replays += 1
        return cap.split(cap.host_out, cands)

    def _capture(self, B: int) -> _Capture | None:
        return try_capture(lambda: _Capture(self, B), f"cached scoring for {B} user groups")


def try_capture(make, what: str):
    """make() (a capture), or None, said once in the log, when the work cannot be captured (it runs eagerly)."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 (any failure means: not capturable, run eagerly)
        log.warning("%s cannot be captured in a CUDA graph (%s: %s); it runs eagerly", what, type(exc).__name__, exc)
        torch.cuda.synchronize()
        return None


def run_off_capture(fn, device: torch.device):
    """fn() once on a side stream before its capture (compiles and lazy initialization happen here, not in
    the graph), then everything finished; returns its output."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    return out


class Staged:
    """One batch size's fixed buffers, [B*T candidate ids | B*P page ids | B lengths] on the host and on the
    device, and the scoring over them (what the graph captures; on a CPU, tests call it directly). The page
    ids are int32, as the kernels read them, two to an int64 slot: no conversion kernel in the graph."""

    def __init__(self, model: HstuModel, k_pages: torch.Tensor, v_pages: torch.Tensor, B: int, T: int, P: int,
                 page_locked: bool):
        self.model, self.k_pages, self.v_pages = model, k_pages, v_pages
        self.B, self.T, self.P = B, T, P
        self.table_at = (B * T, B * T + (B * P + 1) // 2)  # the int64 slots holding the int32 page table
        n = self.table_at[1] + B
        self.host = host_buffer(n, page_locked=page_locked)[:n]
        self.host_t = torch.from_numpy(self.host)
        self.stage([[0]] * B, [1] * B, [np.zeros(0, np.int64)] * B)  # one cached row each (page 0)
        self.flat = self.host_t.to(k_pages.device)
        self.delta = torch.arange(B + 1, device=k_pages.device, dtype=torch.int64) * T  # [B+1]

    def score(self) -> torch.Tensor:
        """Probabilities [B*T, tasks] for what the device buffer holds."""
        B, T, P = self.B, self.T, self.P
        (lo, hi) = self.table_at
        cand = self.flat[:B * T]
        table = self.flat[lo:hi].view(torch.int32)[:B * P].view(B, P)  # [B, P] int32 (a view)
        lengths = self.flat[hi:]
        cache = PagedKVCache(self.k_pages, self.v_pages, table, lengths)
        return self.model.score_cached(cache, cand, self.delta).float()

    def stage(self, pages: Sequence[Sequence[int]], rows: Sequence[int], cands: Sequence[np.ndarray]) -> None:
        B, T, P = self.B, self.T, self.P
        (lo, hi) = self.table_at
        ids = self.host[:B * T].reshape(B, T)
        table = self.host[lo:hi].view(np.int32)[:B * P].reshape(B, P)
        ids.fill(PAD_ITEM)
        table.fill(0)
        for b, (pg, c) in enumerate(zip(pages, cands)):
            ids[b, :len(c)] = c
            table[b, :len(pg)] = pg
        self.host[hi:] = rows

    def split(self, out: np.ndarray, cands: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [out[b * self.T: b * self.T + len(c)].copy() for b, c in enumerate(cands)]


class _Capture(Staged):
    """Staged + its CUDA graph: copy in, score, copy the probabilities out to a page-locked buffer."""

    def __init__(self, owner: PagedScoreGraphs, B: int):
        super().__init__(owner.model, owner.k_pages, owner.v_pages, B, owner.T, owner.P, page_locked=True)
        out = run_off_capture(self.score, owner.device)
        self.host_out = host_buffer(out.numel(), True, np.float32)[:out.numel()].reshape(out.shape)
        dst = torch.from_numpy(self.host_out)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=owner._mempool):
            self.flat.copy_(self.host_t, non_blocking=True)
            out = self.score()
            dst.copy_(out, non_blocking=True)


# ---- a cache miss's prefill ---------------------------------------------------------------------------
PREFILL_STEP = ROW_BUCKET  # rows between prefill buckets: at most 511 padding rows of LayerNorm and GEMM work


class PrefillGraphs:
    """A lone cache miss's prefill (HstuModel.prefill of one user) as a CUDA-graph replay, one graph per row
    bucket, all captured at startup (capture), so no request pays for one.

    Eagerly, a 4096-row prefill is ~50 op launches of Python each; captured, it is one launch. Shapes are
    static per bucket: the user's n rows, then a padding user of bucket - n >= max(1, C) rows (item 0, rating
    0, contextual id 0, at the user's query time) that only fills the rows. Every op is per row or per user (attention reads each
    user's own rows through the jagged offsets), so the padding changes nothing of the real user's K/V
    beyond rounding (fp32 on the CPU: equal to the unpadded prefill to 1e-6; bf16 on a GPU: within one bf16
    step, as the extra user changes the attention's key-split count). The K/V handed back are views of the graph's output buffers,
    marked borrowed: the store copies them into its pages, and UserKV.owned copies them where it does not."""

    def __init__(self, model: HstuModel, max_rows: int, step: int = PREFILL_STEP):
        cfg = model.cfg
        # the rows a user of n rows runs at: the compiled engine's rule (model/layout.bucket_rows), up to max_rows
        self._bucket = functools.partial(bucket_rows, contextual_len=cfg.contextual_len, max_seq_len=cfg.max_seq_len,
                                         most=max_rows, step=step)
        self.model, self.max_rows = model, max_rows
        self.buckets = row_buckets(max_rows, cfg.contextual_len, cfg.max_seq_len, step)
        self.device = next(model.parameters()).device
        self._graphs: dict[int, _PrefillCapture | PrefillStaged | None] = {}  # None: capture failed
        self._mempool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.replays, self.capture_s = 0, 0.0

    def bucket_for(self, rows: int) -> int | None:
        return self._bucket(rows) if 0 < rows <= self.max_rows else None

    def ready(self, rows: int) -> bool:
        """Whether a user of this many [contextual][history] rows would be a replay (run does not return None)."""
        bucket = self.bucket_for(rows)
        return bucket is not None and self._graphs.get(bucket) is not None

    def capture(self) -> int:
        """Capture every bucket (on a CPU: stage them, for tests); returns how many are ready."""
        t0 = time.perf_counter()
        for b in self.buckets:
            if b not in self._graphs:
                self._graphs[b] = self._make(b)
        self.capture_s += time.perf_counter() - t0
        return sum(g is not None for g in self._graphs.values())

    def _make(self, bucket: int) -> _PrefillCapture | PrefillStaged | None:
        if self.device.type != "cuda":
            return PrefillStaged(self.model, bucket, page_locked=False)
        return try_capture(lambda: _PrefillCapture(self, bucket), f"the prefill of {bucket} rows")

    def run(self, ids: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray, query_time: int) -> UserKV | None:
        """One user's [contextual][history] rows -> its K/V (borrowed views), or None where no bucket is ready."""
        bucket = self.bucket_for(len(ids))
        staged = self._graphs.get(bucket) if bucket is not None else None
        if staged is None:
            return None
        staged.stage(ids, ratings, timestamps, query_time)
        keys, values = staged.replay()
        self.replays += 1
        n = len(ids)
        return UserKV([k[:n] for k in keys], [v[:n] for v in values], borrowed=True)

    def describe(self) -> str:
        ready = sum(g is not None for g in self._graphs.values())
        return (f"{ready} of {len(self.buckets)} row buckets ({self.buckets[0]}..{self.buckets[-1]} rows) ready "
                f"in {self.capture_s:.1f} s, {self.replays} replays")


class PrefillStaged:
    """One bucket's fixed buffers, [ids | ratings | timestamps] x bucket rows, then offsets [0, n, bucket] and
    the query time twice (the padding user's too), on the host and on the device, and the prefill over them.
    On a CPU, replay() runs it eagerly (what tests compare against the unpadded prefill)."""

    def __init__(self, model: HstuModel, bucket: int, page_locked: bool):
        self.model, self.L = model, bucket
        n = 3 * bucket + 5
        self.host = host_buffer(n, page_locked=page_locked)[:n]
        self.host_t = torch.from_numpy(self.host)
        one = np.ones(1, np.int64)
        self.stage(one, one * 0, one * 0, 0)
        self.flat = self.host_t.to(next(model.parameters()).device)

    def stage(self, ids: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray, query_time: int) -> None:
        L, n = self.L, len(ids)
        self.wait()
        h = self.host
        for at, real, pad in ((0, ids, 0), (L, ratings, 0), (2 * L, timestamps, query_time)):
            h[at:at + n] = real
            h[at + n:at + L] = pad
        h[3 * L:] = (0, n, L, query_time, query_time)

    def prefill(self) -> KVCache:
        L = self.L
        f = self.flat
        return self.model.prefill(f[:L], f[L:2 * L], f[2 * L:3 * L], f[3 * L:3 * L + 3], f[3 * L + 3:])

    def replay(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.flat.copy_(self.host_t)
        cache = self.prefill()
        return cache.keys, cache.values

    def wait(self) -> None:
        """Until the last replay has read the host buffer (eagerly: it has)."""


class _PrefillCapture(PrefillStaged):
    """PrefillStaged + its CUDA graph: the copy in and the prefill, into fixed K/V buffers."""

    done: torch.cuda.Event | None = None  # recorded after each replay (None until the capture)

    def __init__(self, owner: PrefillGraphs, bucket: int):
        super().__init__(owner.model, bucket, page_locked=True)
        run_off_capture(self.prefill, owner.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=owner._mempool):
            self.flat.copy_(self.host_t, non_blocking=True)
            cache = self.prefill()
        self.keys, self.values = cache.keys, cache.values
        self.done = torch.cuda.Event()
        self.done.record()

    def replay(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        self.graph.replay()  # (what reads the K/V next is queued behind it on the same stream)
        self.done.record()
        return self.keys, self.values

    def wait(self) -> None:
        """The replay copies the page-locked host buffer asynchronously: the next stage must not overwrite it
        before that copy has run."""
        if self.done is not None:
            self.done.synchronize()
