"""`--runner vllm`: the bundle's model served through vLLM's engine (scheduler, continuous batching),
in this process, through vLLM's official plugin interfaces only (vllm_plugin/: an out-of-tree pooling
model registered from a vllm.general_plugins entry point, and an IO processor plugin).

What vLLM does and does not give this model: docs/serving-vllm.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import tempfile
import threading
import time
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from hstu_opt._lazy import require
from hstu_opt.errors import BundleError, ServeError
from hstu_opt.model.checkpoint import META, WEIGHTS
from hstu_opt.serve.runners.base import QueueFull, RankInput, RankOutput, RetrieveInput, Runner, Unavailable
from hstu_opt.serve.runners.vllm_plugin import ARCHITECTURE, IO_PROCESSOR, MODEL_TYPE
from hstu_opt.serve.served_bundle import CHECKPOINT, ServedBundle
from hstu_opt.serve.settings import ServeSettings

# An engine in this process (the runner's own thread steps it), no GPU, a token KV-cache reservation:
# vLLM keeps no KV cache for this model (vllm_plugin/model.py), but its CPU platform wants a size.
ENGINE_RULE = "--runner vllm always runs the checkpoint's PyTorch model inside vLLM (--engine auto or eager)"

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}


def write_model_dir(bundle: ServedBundle, out: Path) -> Path:
    """The directory vLLM loads: config.json (architecture, the checkpoint's HstuConfig, IO processor) and
    the bundle's checkpoint files, linked rather than copied."""
    ckpt = bundle.path / CHECKPOINT
    if not (ckpt / WEIGHTS).is_file():
        raise BundleError(f"{bundle.path}: no {CHECKPOINT / WEIGHTS}: rebuild the bundle")
    out.mkdir(parents=True)
    config = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "hstu": bundle.cfg.to_dict(),
              "io_processor_plugin": IO_PROCESSOR, "dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in (WEIGHTS, META):
        (out / name).symlink_to((ckpt / name).resolve())
    return out


class EngineDead(Unavailable):
    """vLLM's engine failed a step (its scheduler state is then unusable); the server must be restarted."""


class EngineThread:
    """Owns vLLM's in-process engine (LLMEngine; VLLM_ENABLE_V1_MULTIPROCESSING=0). That engine is not
    thread-safe and its steps block, so one thread builds it, adds requests and steps it while any are
    unfinished; the event loop hands requests over and awaits futures. Requests that arrive during a step
    join the scheduler's next one (continuous batching). A failed step ends the engine, as it ends vLLM's
    own engine core: everything waiting and everything submitted later fails with EngineDead."""

    def __init__(self, make_engine, loop: asyncio.AbstractEventLoop):
        self._make_engine, self._loop = make_engine, loop
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: dict[str, asyncio.Future] = {}
        self._lock = threading.Lock()  # orders submit() against the engine's death
        self.engine = None
        self.dead: EngineDead | None = None
        self.steps = self.sequences = self.largest_step = 0  # what vLLM's scheduler batched (describe())
        self.started: asyncio.Future = loop.create_future()
        self._thread = threading.Thread(target=self._run, name="vllm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list, params: list) -> list[asyncio.Future]:
        """One request's sequences, handed over together so that they reach the same step when they fit."""
        batch = [(uuid.uuid4().hex, p, q, self._loop.create_future()) for p, q in zip(prompts, params)]
        with self._lock:
            if self.dead is not None:
                raise self.dead
            self._inbox.put(batch)
        return [fut for *_, fut in batch]

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
        except BaseException as exc:  # noqa: BLE001 (handed to start(), which raises it)
            self._loop.call_soon_threadsafe(_settle, self.started, None, exc)
            return
        self._loop.call_soon_threadsafe(_settle, self.started, None, None)
        try:
            while self._add_handed_over(block=not self.engine.has_unfinished_requests()):
                if self.engine.has_unfinished_requests():
                    done = [out for out in self.engine.step() if out.finished]
                    for out in done:
                        self._settle(out.request_id, out, None)
                    self._count(len(done))
        except Exception as exc:  # noqa: BLE001 (a failed step: the engine is unusable)
            self._die(exc)
        finally:
            self.engine.engine_core.shutdown()

    def _count(self, finished: int) -> None:
        """Without chunked prefill every sequence a step schedules finishes in it: `finished` is its batch."""
        if finished:
            self.steps += 1
            self.sequences += finished
            self.largest_step = max(self.largest_step, finished)

    def _die(self, exc: Exception) -> None:
        dead = EngineDead(f"vLLM's engine failed ({type(exc).__name__}: {exc}); restart the server")
        dead.__cause__ = exc
        with self._lock:
            self.dead = dead
            while True:  # requests handed over but never added
                try:
                    batch = self._inbox.get_nowait()
                except queue.Empty:
                    break
                self._waiting.update({rid: fut for rid, _, _, fut in batch or ()})
        for rid in list(self._waiting):
            self._settle(rid, None, dead)

    def _add_handed_over(self, block: bool) -> bool:
        """Add every request handed over so far (waiting for one when the engine is idle); False on close."""
        while True:
            try:
                batch = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if batch is None:
                return False
            self._waiting.update({rid: fut for rid, _, _, fut in batch})
            try:
                self._add(batch)
            except Exception as exc:  # noqa: BLE001 (vLLM rejected the request: its caller gets the error)
                for rid, *_ in batch:
                    self._settle(rid, None, exc)
            block = False

    def _add(self, batch: list) -> None:
        """Prompts -> vLLM's engine inputs (its renderer checks them, e.g. against max_model_len) -> requests."""
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        model_config = self.engine.vllm_config.model_config
        inputs = self.engine.renderer.render_cmpl([parse_model_prompt(model_config, p) for _, p, _, _ in batch])
        for (rid, _, params, _), engine_input in zip(batch, inputs):
            self.engine.add_request(rid, engine_input, params)

    def _settle(self, rid: str, out, exc: BaseException | None) -> None:
        fut = self._waiting.pop(rid, None)  # None: its request already failed (another of its sequences)
        if fut is not None:
            self._loop.call_soon_threadsafe(_settle, fut, out, exc)


def _settle(fut: asyncio.Future, out, exc: BaseException | None) -> None:
    if fut.done():  # the caller went away
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(out)


class VllmRunner(Runner):
    name = "vllm"
    engine = "vllm"

    def __init__(self, bundle: ServedBundle, *, max_num_seqs: int = 32, max_queue: int = 1024,
                 batch_tokens: int | None = None):
        """max_num_seqs: vLLM's cap on sequences per engine step (a ranking request is one sequence per group
        of max_targets candidates); batch_tokens: its cap on rows per step (default: max_num_seqs sequences
        of the longest length); max_queue: requests admitted at once before QueueFull."""
        self.bundle, self.max_num_seqs, self.max_queue = bundle, max_num_seqs, max_queue
        self.max_len = bundle.cfg.max_seq_len  # C + max_history_len + max_targets: one candidate group
        self.batch_tokens = max(self.max_len, batch_tokens or max_num_seqs * self.max_len)
        self._thread: EngineThread | None = None
        self._io = self._dir = None
        self._ready = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        os.environ.update(VLLM_ENV)
        require("vllm", backend="vllm runner", extra="vllm")
        from vllm.plugins.io_processors import get_io_processor

        self._dir = Path(tempfile.mkdtemp(prefix="hstu-vllm-"))
        try:
            model_dir = write_model_dir(self.bundle, self._dir / "model")
            self._thread = EngineThread(lambda: self._make_engine(model_dir), asyncio.get_running_loop())
            await self._thread.started
            engine = self._thread.engine
            self._io = get_io_processor(engine.vllm_config, engine.renderer)  # config.json names the plugin
            await self._encode(self._warm_up_request())
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._ready = True

    def _make_engine(self, model_dir: Path):
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        args = EngineArgs(
            model=str(model_dir), runner="pooling", skip_tokenizer_init=True, dtype="float32",
            max_model_len=self.max_len, max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.batch_tokens,
            # a sequence is scored in the step that schedules its whole prompt (HstuPooler): no chunking
            enable_chunked_prefill=False, enable_prefix_caching=False, enforce_eager=True, disable_log_stats=True,
        )
        return LLMEngine.from_engine_args(args)

    def _warm_up_request(self) -> RankInput:
        one = np.ones(1, np.int64)
        C = self.bundle.cfg.contextual_len
        return RankInput(user_id=None, item_ids=one, ratings=one * 0, timestamps=one * 0, candidates=one,
                         query_time=0, contextual_ids=one.repeat(C) if C else None, truncated=False)

    async def stop(self) -> None:
        self._ready = False
        await self._idle.wait()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.close)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def ready(self) -> bool:
        return self._ready and self._thread is not None and self._thread.dead is None

    # ---- requests ------------------------------------------------------------------------
    async def rank(self, req: RankInput) -> RankOutput:
        t0 = time.perf_counter()
        probs = await self._admit(req)
        return RankOutput(probs=probs, cache="off", timing_ms={"vllm": round((time.perf_counter() - t0) * 1e3, 3)})

    async def retrieve(self, req: RetrieveInput) -> np.ndarray:
        return await self._admit(req)

    async def _admit(self, req: RankInput | RetrieveInput) -> np.ndarray:
        if not self._ready:
            raise Unavailable("the vLLM engine is " + ("loading" if self._io is None else "draining for shutdown"))
        if self._in_flight >= self.max_queue:
            raise QueueFull(retry_after_s=1.0)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._encode(req)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _encode(self, req: RankInput | RetrieveInput) -> np.ndarray:
        io = self._io
        request = io.parse_data(req)
        outputs = await asyncio.gather(*self._thread.submit(io.pre_process(request), io.pooling_params(request)))
        return io.post_process(outputs)

    def describe(self) -> dict:
        t = self._thread
        return {
            "runner": self.name, "engine": self.engine,
            "engine_reason": "--runner vllm: the bundle's checkpoint in hstu-opt's PyTorch model (reference ops), "
                             "run by vLLM's in-process engine",
            "engine_rule": ENGINE_RULE,
            "cache": {"enabled": False, "why": "vLLM's KV cache is built for softmax attention; under this runner "
                                               "every candidate group runs its history again (docs/serving-vllm.md)"},
            "batching": {"by": "vLLM's scheduler", "max_num_seqs": self.max_num_seqs,
                         "max_num_batched_tokens": self.batch_tokens, "max_model_len": self.max_len,
                         "max_queue": self.max_queue, "candidate_group": self.bundle.cfg.max_targets,
                         "steps": t.steps if t else 0, "sequences": t.sequences if t else 0,
                         "largest_step": t.largest_step if t else 0},
            "vllm": _vllm_version(),
        }


def create_runner(bundle: ServedBundle, settings: ServeSettings) -> VllmRunner:
    """`hstu-opt serve --runner vllm` (runners/base.py). --max-batch caps the sequences of one vLLM step;
    --max-wait-ms has no counterpart (vLLM steps as soon as anything waits); the cache is always off."""
    if settings.engine not in ("auto", "eager"):
        raise ServeError(f"--engine {settings.engine} with --runner vllm: vLLM runs the checkpoint's PyTorch model "
                         "(eager); drop --engine, or use --runner native for the bundle's other engines")
    return VllmRunner(bundle, max_num_seqs=settings.max_batch, max_queue=settings.max_queue)


def _vllm_version() -> str | None:
    try:
        return version("vllm-cpu")
    except PackageNotFoundError:
        return None
