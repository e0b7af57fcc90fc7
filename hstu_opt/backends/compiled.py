"""compiled: the jagged serving graph under torch.compile, shipped with Inductor's cache artifacts.

The GPU engine where AOTInductor packages cannot load (ENVIRONMENT.md: on the H200 image loading any
AOTInductor artifact segfaults). It compiles HstuModel.rank_jagged (the last layer runs for the
candidate rows only): on CUDA with the Triton ops, in the recipe's dtype, replayed from CUDA graphs
the runner captures itself (below); on a CPU machine with the reference ops through Inductor's C++
codegen, which is what CI builds, loads and runs.

On CUDA with the Triton ops every layer but the last runs outside the compiled graphs
(HstuModel.use_eager_layers): those layers are nothing but the ops' own kernels, and launched eagerly
the attention reads through TMA descriptors, which it cannot inside Inductor's graph. dlrm-v3 batch 16
in-process, CUDA-graph replays (run 34, benchmarks/results/variants_ab_h200_2026-11-29_run34.json):
5.49 ms against 5.56 ms with the whole graph compiled (attention 2.60 against 2.88 ms of kernel time),
batch 1 0.717 against 0.697 ms.

The engine directory stands alone:
  checkpoint/              the weights (safetensors) and config
  ranking.compiled.json    device, impl, dtype, limits, warmed shapes, versions, cold and warm start
  ranking.cache.bin        torch.compiler.save_cache_artifacts() of the cold compile
  ranking.triton/          Triton's cache entries of the kernels the eager layers launch (the cache
                           artifacts carry only what Inductor compiled); installed into the process's
                           Triton cache at load, so a fresh process compiles nothing
  ranking.cutlass.so       (engine.ops naming cutlass) the CUTLASS kernels' library the engine was built
                           with, loaded from here (compiled ahead by cutlass_kernels/build.py)

Cold and warm start are each measured in a fresh process with empty Inductor and Triton cache
directories, so the warm one can only be warm through the shipped artifacts; the warm process also
checks its outputs against the cold one's.

The runner takes the padded feed every engine takes and copies it as it is (no per-user work on the
host) into one pinned staging buffer; on the device, inside the compiled graph, pack_jagged turns it
into jagged rows [contextual][history][candidates] per user and the candidates' probabilities are
scattered back to [B, Nc, T] (padding slots 0). jagged_feed is the same conversion on the host, the
reference the tests hold pack_jagged to. As the runner's path it cost 0.96 ms of host time per
batch-16 request on the H200 machine, 0.16 ms at batch 1 (runner phases, run 24); with the conversion
on the device, compiled into the graph, 0.21 and 0.03 ms, and the engine's wall time (p50) went from
7.46 to 6.63 ms at batch 16 and from 1.09 to 0.82 ms at batch 1 (gpu_hstu_2026-11-29_run27_engine.json;
that machine's host was slower in both runs than in run 17's 6.88 / 0.90).

CUDA graphs: on the second request of a given size (padded shape, jagged rows rounded up by bucket_rows
to a multiple of 512 with a padding user, candidates) the runner
captures the compiled graph into a torch.cuda.CUDAGraph (one memory pool shared by all graphs) together
with its two copies: from the runner's one page-locked staging buffer (sized for the limits, so its
address never changes) to the device, and the probabilities back to a page-locked host array. From then
on a request is staging, one graph launch and one wait. That skips what torch.compile's own CUDA graphs
(mode="reduce-overhead") cost on every call: Dynamo's guards and the graph tree's input copies and
checks, 0.9 ms of the 1.85 ms batch-1 wall time measured on the H200 (benchmarks/results/
gpu_hstu_2026-11-29_run10.json). With the copies outside the graph, the copy in of a batch-16 request
cost 0.19 ms more host time than at batch 1 (launch phase 0.25 against 0.06 ms, run 35); inside it,
0.03 ms at both (run 36). At most MAX_GRAPHS sizes are captured; requests of further sizes run the
compiled graph directly.

Zero-copy input: feed_buffers(B, Nh, Nc) hands out the staging buffer's own arrays; a request written
into them (as a server parsing requests straight into the engine's buffers would) is not copied again.
Batch 16 on the H200 (run 36): host preparation 0.03 against 0.17 ms for a feed of separate arrays.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from hstu_opt import toolchain
from hstu_opt.backends.eager import (ShapeOutOfRange, check_dims, check_feed, engine_limits, example_feed,
                                     input_names)
from hstu_opt.errors import HstuOptError, StageError
from hstu_opt.fsutil import replace_dir, sha256_file, write_bytes_atomic, write_json_atomic
from hstu_opt.model.checkpoint import load_checkpoint, save_checkpoint
from hstu_opt.model.hstu import HstuModel
from hstu_opt.model.layout import bucket_rows, row_owner
from hstu_opt.ops import Impl

NAME = "compiled"
META = "ranking.compiled.json"
CACHE = "ranking.cache.bin"
TRITON_CACHE = "ranking.triton"  # Triton's cache entries of the kernels launched outside the compiled graphs
CUTLASS_LIB = "ranking.cutlass.so"  # the CUTLASS kernels' library (cutlass_kernels/), when an op runs them
JAGGED_INPUTS = ("ids", "ratings", "timestamps", "offsets", "num_targets", "query_time", "target_rows", "history_rows")
MAX_GRAPHS = 16


def device_plan(impl: str | dict | None = None) -> dict:
    """What to compile on this machine. `impl` (default: Triton for every op on CUDA, the reference on a
    CPU) may map op names to implementations, e.g. Triton attention with Inductor-fused projections."""
    if torch.cuda.is_available():
        impl = impl or Impl.TRITON.value
        return {"device": "cuda", "impl": impl, "mode": "default", "cuda_graphs": True,
                "eager_layers": impl == Impl.TRITON.value, "gpu": torch.cuda.get_device_name()}
    if isinstance(impl, dict):  # a recipe's per-op map (engine.ops) names GPU kernels
        impl = None
    return {"device": "cpu", "impl": impl or Impl.REFERENCE.value, "mode": "default", "cuda_graphs": False,
            "eager_layers": False, "gpu": None}


def _impl(spec: str | dict) -> Impl | dict:
    return {op: Impl(v) for op, v in spec.items()} if isinstance(spec, dict) else Impl(spec)


def jagged_feed(feed: dict[str, np.ndarray], contextual_len: int, buffer: np.ndarray | None = None,
                rows_to: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Padded engine feed -> jagged rows [contextual][history][candidates] per user (what rank_jagged
    takes, as int64 views of one flat array: `buffer` when it is large enough) and the [B, Nc] mask of
    real candidate slots (row-major order = target_rows order), on the host: the reference pack_jagged
    is tested against, and what the benchmarks feed the eager model. Per-user slice copies.
    rows_to (bucket_rows): a padding user after the real ones fills the rows up to it, as pack_jagged does:
    item 0 (contextual id 0), rating 0, the first user's query time, no targets."""
    hist_ids = feed["hist_ids"]
    B = hist_ids.shape[0]
    Nc = feed["cand_ids"].shape[1]
    C = contextual_len
    hl, nc = feed["hist_lengths"].astype(np.int64), feed["num_candidates"].astype(np.int64)
    qt = feed["query_time"].astype(np.int64)
    U = B + (rows_to is not None)  # users, the padding one included
    offsets = np.zeros(U + 1, np.int64)
    np.cumsum(C + hl + nc, out=offsets[1:B + 1])
    if rows_to is not None:
        offsets[-1] = rows_to
        nc, qt = np.r_[nc, 0], np.r_[qt, qt[0]]
    L, T = int(offsets[-1]), int(nc.sum())
    sizes = (L, L, L, U + 1, U, U, T, L - T)
    total = sum(sizes)
    flat = buffer[:total] if buffer is not None and buffer.size >= total else np.empty(total, np.int64)
    rows = dict(zip(JAGGED_INPUTS, np.split(flat, np.cumsum(sizes)[:-1])))
    ids, ratings, ts = rows["ids"], rows["ratings"], rows["timestamps"]
    rows["offsets"][:], rows["num_targets"][:], rows["query_time"][:] = offsets, nc, qt
    ctx = feed["contextual_ids"] if C > 0 else None
    t = h = 0
    for b in range(B):
        s, n_h, n_c = int(offsets[b]), int(hl[b]), int(nc[b])
        hs, cs, e = s + C, s + C + n_h, s + C + n_h + n_c  # history, candidates, end
        if C:
            ids[s:hs] = ctx[b]
        ids[hs:cs], ids[cs:e] = hist_ids[b, :n_h], feed["cand_ids"][b, :n_c]
        ratings[s:hs], ratings[hs:cs], ratings[cs:e] = 0, feed["hist_ratings"][b, :n_h], 0
        ts[s:hs], ts[hs:cs], ts[cs:e] = qt[b], feed["hist_timestamps"][b, :n_h], qt[b]
        rows["history_rows"][h:h + C + n_h] = np.arange(s, cs)
        rows["target_rows"][t:t + n_c] = np.arange(cs, e)
        h, t = h + C + n_h, t + n_c
    if rows_to is not None:  # the padding user: every row a history row
        s = int(offsets[B])
        ids[s:], ratings[s:], ts[s:] = 0, 0, qt[0]
        rows["history_rows"][h:] = np.arange(s, rows_to)
    return rows, np.arange(Nc)[None] < nc[:B, None]


PADDED_INPUTS = ("hist_ids", "hist_ratings", "hist_timestamps", "cand_ids", "contextual_ids", "hist_lengths",
                 "num_candidates", "query_time")


def staged_shapes(B: int, Nh: int, Nc: int, C: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of PADDED_INPUTS, in the order the flat staging layout holds them."""
    return ((B, Nh),) * 3 + ((B, Nc), (B, C)) + ((B,),) * 3


def staged_sizes(B: int, Nh: int, Nc: int, C: int) -> tuple[int, ...]:
    """Element counts of PADDED_INPUTS in the flat staging layout."""
    return tuple(math.prod(shape) for shape in staged_shapes(B, Nh, Nc, C))


def stage_feed(feed: dict[str, np.ndarray], contextual_len: int, buffer: np.ndarray) -> int:
    """Copy the padded feed, as int64, into the front of `buffer` in PADDED_INPUTS order (a few flat copies,
    nothing per user); returns the number of elements written. numpy's copies run on the calling thread:
    a torch.cat of the flat inputs, which copies on several threads, was 2.5x faster in a tight loop on the
    H200 machine's host (benchmarks/results/batch16_probe_h200_2026-11-29_run35.json) but slower between
    requests (batch 16 host preparation 0.46 against 0.32 ms, run 35), when its idle threads must wake first."""
    B, Nh = feed["hist_ids"].shape
    sizes = staged_sizes(B, Nh, feed["cand_ids"].shape[1], contextual_len)
    at = 0
    for name, n in zip(PADDED_INPUTS, sizes):
        if n:
            buffer[at:at + n] = feed[name].reshape(-1)
        at += n
    return at


def pack_jagged(flat: torch.Tensor, B: int, Nh: int, Nc: int, C: int, L: int,
                T: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The staged padded feed (stage_feed's layout, on any device) -> rank_jagged's inputs, as jagged_feed
    builds them on the host (per user [C contextual][hist_lengths history][num_candidates candidate]
    rows, then a padding user up to L rows: jagged_feed's rows_to), and each target row's slot in the
    padded [B * Nc] candidates. L rows (bucket_rows of the real ones) and T candidates in all: the host
    knows both from the lengths, so every shape here is static and nothing syncs. The padding user's rows
    (item 0, rating 0, no targets) are computed and never read: attention keeps to each user's rows."""
    parts = torch.split(flat, list(staged_sizes(B, Nh, Nc, C)))
    hist_ids, hist_ratings, hist_ts, cand_ids, ctx_ids, hl, nc, qt = (
        t.view(shape) for t, shape in zip(parts, staged_shapes(B, Nh, Nc, C)))
    n_hist = hl + C  # rows before the candidates, contextual ones included
    ends = (n_hist + nc).cumsum(0)
    pad = (L - ends[-1:])  # [1]: the padding user's rows, all of them history rows
    ends_all = torch.cat([ends, ends.new_full((1,), L)])  # [B+1]
    offsets = torch.nn.functional.pad(ends_all, (1, 0))  # [B+2]
    rows = torch.arange(L, device=flat.device)
    user = row_owner(ends_all, rows)  # [L], B on the padding user's rows
    real = user < B
    u = user.clamp(max=B - 1)  # (the padding rows read some user's slots, then are masked)
    pos = rows - offsets[user]
    hl_u = hl[u]
    in_hist = real & (pos >= C) & (pos < C + hl_u)
    h_pos = (pos - C).clamp(0, Nh - 1)
    c_pos = (pos - C - hl_u).clamp(0, Nc - 1)
    ids = torch.where(in_hist, hist_ids[u, h_pos], cand_ids[u, c_pos])
    if C > 0:
        ids = torch.where(pos < C, ctx_ids[u, pos.clamp(max=C - 1)], ids)
    ids = torch.where(real, ids, 0)
    qt_all = torch.cat([qt, qt[:1]])  # [B+1]
    ratings = torch.where(in_hist, hist_ratings[u, h_pos], 0)
    timestamps = torch.where(in_hist, hist_ts[u, h_pos], qt_all[user])
    n_hist_all = torch.cat([n_hist, pad])  # [B+1]
    hist_ends, cand_ends = n_hist_all.cumsum(0), nc.cumsum(0)
    j = torch.arange(L - T, device=flat.device)
    hu = row_owner(hist_ends, j)
    t = torch.arange(T, device=flat.device)
    tu = row_owner(cand_ends, t)
    hist_offsets, cand_offsets = hist_ends - n_hist_all, cand_ends - nc  # each user's first history / candidate
    rows = {"ids": ids, "ratings": ratings, "timestamps": timestamps, "offsets": offsets,
            "num_targets": torch.nn.functional.pad(nc, (0, 1)), "query_time": qt_all,
            "target_rows": offsets[tu] + n_hist[tu] + (t - cand_offsets[tu]),
            "history_rows": offsets[hu] + (j - hist_offsets[hu])}
    return rows, tu * Nc + (t - cand_offsets[tu])


def serve_padded(model: HstuModel, flat: torch.Tensor, B: int, Nh: int, Nc: int, C: int, L: int, T: int) -> torch.Tensor:
    """What the runner compiles: staged padded feed -> probabilities [B, Nc, tasks] (padding slots 0)."""
    rows, slots = pack_jagged(flat, B, Nh, Nc, C, L, T)
    probs = model.rank_jagged(**rows).float()
    out = probs.new_zeros(B * Nc, probs.shape[-1]).index_put((slots,), probs)
    return out.view(B, Nc, probs.shape[-1])


class CompiledRunner:
    def __init__(self, out_dir: Path, load_cache: bool = True, warmup: bool = True):
        """Loads the weights and the cache artifacts, then (warmup) runs the shipped shapes in the build's
        order: the graphs torch.compile makes depend on the order shapes arrive in (the first compiles
        static, a later one dynamic), so replaying it finds every graph in the artifacts, and the first
        real request, whatever its shape, finds compiled code."""
        self.meta = json.loads((out_dir / META).read_text())
        meta = self.meta
        if meta["device"] == "cuda" and not torch.cuda.is_available():
            raise HstuOptError(f"{out_dir}: this engine was built for a CUDA GPU ({meta['gpu']}) and this machine has "
                               "none: serve the onnxruntime or aoti engine here")
        t0 = time.perf_counter()
        if load_cache:  # (not when compiling the engine cold)
            torch.compiler.load_cache_artifacts((out_dir / CACHE).read_bytes())
        shipped = out_dir / TRITON_CACHE
        self.triton_entries = install_triton_kernels(shipped) if load_cache and shipped.is_dir() else 0
        model, _ = load_checkpoint(out_dir / "checkpoint")
        use_shipped_cutlass(meta, out_dir)
        model.impl = _impl(meta["impl"])
        model.use_eager_layers(bool(meta.get("eager_layers")))
        self.device = torch.device(meta["device"])
        self.model = model.to(self.device, model.cfg.torch_dtype).eval()
        if uses_fp8(meta["impl"]) and self.device.type == "cuda":  # the weights' e4m3 form, before any graph
            from hstu_opt.ops import _fp8

            _fp8.prepare(self.model)
        mode = None if meta["mode"] == "default" else meta["mode"]
        # Automatic dynamic shapes: the first shape compiles static, a second one recompiles once with the
        # changing sizes symbolic. Not dynamic=True: that also makes the config's ints (N, the 1/N scale)
        # symbolic, and the Triton launch then got a float grid size on the H200 (torch 2.11).
        self.fn = torch.compile(self._serve, dynamic=None, mode=mode)
        lim = meta["limits"]
        # the one host buffer every request is staged in (page-locked on CUDA), sized for the largest
        # request the limits allow: its address never changes, so CUDA graphs copy from it themselves
        self._staged = host_buffer(sum(staged_sizes(lim["batch"][1], lim["history"][1], lim["candidates"][1],
                                                    lim["contextual_len"])), self.device.type == "cuda")
        self._views: dict[str, np.ndarray] | None = None  # what feed_buffers handed out last
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()
        self._pool = torch.cuda.graph_pool_handle() if meta.get("cuda_graphs") else None
        # requests by path (CUDA graphs or not; in_place: fed through feed_buffers, nothing staged)
        self.stats = {"captures": 0, "replays": 0, "direct": 0, "in_place": 0}
        # seconds spent per phase of run(), summed over requests: host preparation (checks, staging the
        # padded feed), launch (enqueueing the copy in, the graph replay or the compiled call, and the copy
        # out), wait (until the device is done) and the host copy of the result ("scatter": the scatter
        # to padded slots itself runs on the device)
        self.phase_s = {"prepare": 0.0, "launch": 0.0, "wait": 0.0, "scatter": 0.0}
        if warmup:
            self.warm_up()
        self.load_s = time.perf_counter() - t0

    def warm_up(self) -> tuple[list[float], list[np.ndarray]]:
        """Run a random request of each shipped shape, twice (the second captures its CUDA graph), in the
        build's order; returns each shape's first-call seconds and first outputs."""
        rng = np.random.default_rng(0)
        times, outs = [], []
        for b, h, c in self.meta["shapes"]:
            feed = example_feed(self.model, "ranking", rng, b, h, c, exact=True)
            t0 = time.perf_counter()
            outs.append(self.run(feed)["probs"])
            times.append(time.perf_counter() - t0)
            self.run(feed)
        return times, outs

    def _serve(self, flat: torch.Tensor, B: int, Nh: int, Nc: int, L: int, T: int) -> torch.Tensor:
        return serve_padded(self.model, flat, B, Nh, Nc, self.meta["limits"]["contextual_len"], L, T)

    def feed_buffers(self, batch: int, history: int, candidates: int) -> dict[str, np.ndarray]:
        """Arrays to write a request of this padded shape into, in place: views of the runner's staging
        buffer (page-locked on a GPU). run() on a feed holding these very arrays skips copying it
        (zero-copy input, as a server that parses requests straight into the engine's buffers would use
        it); they stay valid until the next call of feed_buffers or a run() of another feed. Any other
        feed is copied in as usual."""
        check_dims({"batch": batch, "history": history, "candidates": candidates}, self.meta["limits"])
        C = self.meta["limits"]["contextual_len"]
        views, at = {}, 0
        for name, shape in zip(PADDED_INPUTS, staged_shapes(batch, history, candidates, C)):
            n = math.prod(shape)
            if name in self.meta["inputs"]:
                views[name] = self._staged[at:at + n].reshape(shape)
            at += n
        self._views = views
        return dict(views)

    def _in_place(self, feed: dict[str, np.ndarray]) -> bool:
        """Whether the feed holds the arrays the last feed_buffers call handed out (so is already staged):
        an identity check per input, no per-request cost worth measuring."""
        views = self._views
        return views is not None and all(feed.get(name) is a for name, a in views.items())

    def graph_key(self, B: int, Nh: int, Nc: int, history_rows: int, candidate_rows: int) -> tuple[int, ...]:
        """A request's size as its CUDA graph is keyed: padded (B, Nh, Nc), jagged rows L (bucket_rows of the
        real ones: lengths within a step share a graph) and candidates T."""
        T, C = candidate_rows, self.meta["limits"]["contextual_len"]
        L = bucket_rows(B * C + history_rows + T, C, self.model.cfg.max_seq_len, most=B * (C + Nh + Nc))
        return B, Nh, Nc, L, T

    def replays(self, key: tuple[int, ...]) -> bool:
        """Whether a request of this graph_key runs as a replay of a captured CUDA graph (no compile, no
        capture, no Python per op: well under a millisecond at dlrm-v3 sizes)."""
        return key in self._graphs

    @torch.no_grad()
    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        check_feed(feed, self.meta["limits"], self.meta["inputs"])
        C = self.meta["limits"]["contextual_len"]
        (B, Nh), Nc = feed["hist_ids"].shape, feed["cand_ids"].shape[1]
        # the lengths as Python ints: B of them, where numpy's reductions cost more per call than the sums
        hl, nc = feed["hist_lengths"].tolist(), feed["num_candidates"].tolist()
        for name, lengths, most in (("hist_lengths", hl, Nh), ("num_candidates", nc, Nc)):
            if min(lengths) < 0 or max(lengths) > most:
                raise ShapeOutOfRange(f"{name} must lie in [0, {most}] (the padded width of this request), got "
                                      f"{min(lengths)}..{max(lengths)}: fix the request's lengths")
        key = self.graph_key(B, Nh, Nc, sum(hl), sum(nc))
        if self._in_place(feed):
            self.stats["in_place"] += 1
            n = sum(staged_sizes(B, Nh, Nc, C))
        else:
            self._views = None  # (the staging copy overwrites them)
            n = stage_feed(feed, C, self._staged)
        host = torch.from_numpy(self._staged[:n])
        graph = self._graphs.get(key)
        t1 = time.perf_counter()
        if graph is None and self._pool is not None and key in self._seen and len(self._graphs) < MAX_GRAPHS:
            graph = self._graphs[key] = _Graph(self.fn, host, key, self._pool)
            self.stats["captures"] += 1
        if graph is not None:
            graph.launch()
            t2 = time.perf_counter()
            probs = graph.wait()
            self.stats["replays"] += 1
        else:
            self._seen.add(key)
            probs = self.fn(host.to(self.device, non_blocking=True), *key)
            t2 = time.perf_counter()
            probs = probs.cpu().numpy()
            self.stats["direct"] += 1
        t3 = time.perf_counter()
        out = probs.copy()  # (a graph's output buffer is reused by its next replay)
        for phase, dt in zip(self.phase_s, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            self.phase_s[phase] += dt
        return {"probs": out}


def host_buffer(n: int, page_locked: bool, dtype=np.int64) -> np.ndarray:
    """A host array; page-locked (cudaHostRegister) when asked, so copies from and to it are asynchronous
    DMA and can be captured in a CUDA graph. Registered directly rather than taken from torch's pinned
    allocator, whose per-copy event bookkeeping has no place inside a graph capture."""
    a = np.zeros(max(n, 1), dtype)
    if page_locked:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(a.ctypes.data, a.nbytes, 0)
        if err != cudart.cudaError.success:
            raise HstuOptError(f"cudaHostRegister of a {a.nbytes}-byte staging buffer failed: {err}")
        weakref.finalize(a, cudart.cudaHostUnregister, a.ctypes.data)  # (when it and every view of it are gone)
    return a


class _Graph:
    """The compiled graph captured for one request size (B, Nh, Nc, L, T), with its copies: the staged
    request (a fixed host buffer) to the device, and the probabilities back to a host buffer. A request
    is then one graph launch and one wait: the copies cost no launches of their own."""

    def __init__(self, fn, host: torch.Tensor, key: tuple[int, ...], pool):
        self.flat = host.to("cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # one run off the capture: lazy initialization must not be captured
            out = fn(self.flat, *key)
        torch.cuda.current_stream().wait_stream(side)
        self.host_out = host_buffer(out.numel(), True, np.float32)[:out.numel()].reshape(out.shape)
        dst = torch.from_numpy(self.host_out)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.flat.copy_(host, non_blocking=True)
            self.out = fn(self.flat, *key)
            dst.copy_(self.out, non_blocking=True)

    def launch(self) -> None:
        self.graph.replay()

    def wait(self) -> np.ndarray:
        torch.cuda.current_stream().synchronize()
        return self.host_out


def _own_kernel(entry: Path) -> str | None:
    """The kernel a Triton cache entry (a directory per compiled specialization) holds, from its group file,
    if it is one of hstu-opt's own (not Inductor's generated `triton_*` ones, which the cache artifacts
    carry); None otherwise, or when the entry has no group file (an interrupted write)."""
    group = next(entry.glob("__grp__*.json"), None)
    name = group.name[len("__grp__"):-len(".json")] if group else None
    return name if name and not name.startswith("triton_") else None


def ship_triton_kernels(cache_dir: Path, dest: Path) -> int:
    """Copy the entries of a Triton cache directory that hold hstu-opt's own kernels (not Inductor's
    generated `triton_*` ones, which the cache artifacts carry) into `dest` (replaced whole); returns how
    many. These are the kernels the layers launch outside the compiled graphs (eager_layers): without
    them a fresh process would compile them again on its first request."""
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    n = 0
    for entry in sorted(p for p in cache_dir.iterdir() if p.is_dir()) if cache_dir.is_dir() else []:
        if _own_kernel(entry):
            shutil.copytree(entry, tmp / entry.name)
            n += 1
    replace_dir(tmp, dest)
    return n


def triton_cache_dir() -> Path:
    from triton import knobs  # (only engines built with eager_layers ship kernels: they run on a GPU)

    return Path(knobs.cache.dir)


def install_triton_kernels(shipped: Path, cache_dir: Path | None = None) -> int:
    """Put the shipped entries into this process's Triton cache (where Triton's launcher looks them up)
    unless already there; each entry is copied to a temp name, then renamed, so a concurrent process
    never sees half an entry. Returns how many entries the engine ships."""
    cache_dir = cache_dir or triton_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    entries = [p for p in shipped.iterdir() if p.is_dir()]
    for entry in entries:
        if not (cache_dir / entry.name).exists():
            tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{entry.name}."))
            shutil.copytree(entry, tmp, dirs_exist_ok=True)
            try:
                os.replace(tmp, cache_dir / entry.name)
            except OSError:  # another process installed it first
                shutil.rmtree(tmp, ignore_errors=True)
    return len(entries)


def load(out_dir: Path, kind: str = "ranking") -> CompiledRunner:
    if kind != "ranking":
        raise HstuOptError(f"the compiled engine serves ranking only, not {kind!r}")
    return CompiledRunner(out_dir)


def build(model: HstuModel, out_dir: Path, max_batch: int, shapes: list[tuple[int, int, int]],
          timeout_s: int = 3600, impl: str | dict | None = None) -> dict:
    """Write the engine directory and compile it (cold) and load it (warm) in two fresh processes.
    `shapes` (batch, history, candidates) are compiled ahead and shipped in the cache artifacts."""
    cfg = model.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "checkpoint", model, {"note": "weights of the compiled engine"})
    meta = {**device_plan(impl), "dtype": cfg.dtype, "limits": engine_limits(cfg, max_batch),
            "inputs": input_names("ranking", cfg.contextual_len), "outputs": ["probs"], "cache": CACHE,
            "shapes": [list(s) for s in shapes], "torch": torch.__version__, "triton": toolchain.toolchain()["triton"]}
    ship_cutlass(meta, out_dir)
    if uses_fp8(meta["impl"]):
        meta["fp8"] = {"weights": "e4m3 per output column (scale = column absmax / 448), a pure function of the "
                                  "shipped bf16 weights, computed at load before any CUDA graph (ops/_fp8.py)",
                       "activations": "e4m3 per row, scales from the quantizing LayerNorm pass",
                       "accuracy": "fp8_accuracy.json in build-engine's output (backends/fp8_gate.py)"}
    write_json_atomic(out_dir / META, meta)
    with tempfile.TemporaryDirectory(prefix="hstu-opt-compiled-") as tmp:
        cold = _fresh_process("compile", out_dir, Path(tmp), timeout_s)
        if cold["nonfinite"]:
            raise StageError(
                f"compiled engine: the compiled model gave {cold['nonfinite']} non-finite probabilities on the warm-up "
                "requests, so it is not shipped: compare it with eager (benchmarks/compile_debug.py shows how; the "
                "last such case was a kernel argument Inductor typed fp64)")
        if meta["eager_layers"]:
            meta["triton_kernels"] = ship_triton_kernels(Path(tmp) / "compile" / "triton", out_dir / TRITON_CACHE)
        warm = _fresh_process("warm", out_dir, Path(tmp), timeout_s)
    meta |= {"cold_start": cold, "warm_start": warm}
    write_json_atomic(out_dir / META, meta)
    return {"backend": NAME, "bytes": (out_dir / CACHE).stat().st_size, **meta}


def uses_cutlass(impl: str | dict) -> bool:
    used = set(impl.values() if isinstance(impl, dict) else [impl])
    return bool(used & {Impl.CUTLASS.value, Impl.CUTLASS_FP8.value})


def uses_fp8(impl: str | dict) -> bool:
    return Impl.CUTLASS_FP8.value in (impl.values() if isinstance(impl, dict) else [impl])


def ship_cutlass(meta: dict, out_dir: Path) -> None:
    """An engine with CUTLASS ops carries the library it is built with ($HSTU_CUTLASS_LIB's, sha256 in the
    meta): its processes load that copy, so the kernels a bundle was checked with are the ones it runs."""
    if not uses_cutlass(meta["impl"]):
        return
    from hstu_opt.ops import _cutlass

    source = os.environ.get(_cutlass.ENV_LIB)
    if not source or not os.path.exists(source):
        _cutlass.library()  # raises CutlassUnavailable, which says how to build it
    shutil.copyfile(source, out_dir / CUTLASS_LIB)
    meta["cutlass_lib"] = {"file": CUTLASS_LIB, "sha256": sha256_file(out_dir / CUTLASS_LIB)}


def use_shipped_cutlass(meta: dict, out_dir: Path) -> None:
    if meta.get("cutlass_lib"):
        from hstu_opt.ops import _cutlass

        os.environ[_cutlass.ENV_LIB] = str(out_dir / meta["cutlass_lib"]["file"])
        _cutlass.library.cache_clear()


def _fresh_process(step: str, out_dir: Path, tmp: Path, timeout_s: int) -> dict:
    """Run `step` in a new interpreter with its own empty Inductor and Triton cache directories."""
    cache = tmp / step
    env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    cmd = [sys.executable, "-m", "hstu_opt.backends.compiled", step, str(out_dir), str(tmp)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise StageError(f"compiled engine: '{step}' took over {timeout_s} s in a fresh process") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise StageError(f"compiled engine: '{step}' failed in a fresh process (exit {proc.returncode}): " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _inductor_counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if "cache" in k}


def _main(step: str, out_dir: Path, tmp: Path) -> dict:
    runner = CompiledRunner(out_dir, load_cache=step != "compile", warmup=False)
    t0 = time.perf_counter()
    times, outs = runner.warm_up()
    total = time.perf_counter() - t0 + runner.load_s
    result = {"nonfinite": int(sum((~np.isfinite(o)).sum() for o in outs)), "seconds": round(total, 3),
              "load_s": round(runner.load_s, 3), "first_call_s": [round(t, 3) for t in times],
              "inductor_cache": _inductor_counters(), "triton_entries_installed": runner.triton_entries}
    if step == "compile":
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise HstuOptError("torch.compiler.save_cache_artifacts() returned nothing: no compilation was recorded")
        write_bytes_atomic(out_dir / CACHE, artifacts[0])
        np.savez(tmp / "cold_outputs.npz", *outs)
    else:
        if runner.meta.get("eager_layers"):  # hstu-opt's kernels in this process's Triton cache it did not ship
            shipped = {p.name for p in (out_dir / TRITON_CACHE).iterdir()}
            result["triton_entries_not_shipped"] = sorted(
                f"{name}:{p.name[:8]}" for p in triton_cache_dir().iterdir()
                if p.is_dir() and p.name not in shipped and (name := _own_kernel(p)))
        cold = np.load(tmp / "cold_outputs.npz")
        result["max_abs_diff_vs_cold"] = max(float(np.abs(o - cold[f"arr_{i}"]).max()) for i, o in enumerate(outs))
    return result


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
