"""The contract between the HTTP layer and whatever runs the model (native scheduler, vLLM).

Routes build a RankInput/RetrieveInput with hstu_opt.serve.requests (validation, truncation,
query-time flooring happen there, once, for every runner), await the runner, and format its output.
A runner never sees HTTP; the routes never see tensors.

Errors a runner raises that the routes turn into answers: QueueFull and Unavailable -> 503 with
Retry-After; anything else -> 500 with the request id (and the traceback in the server log only).

A runner module other than native (e.g. runners/vllm.py) exposes
`create_runner(bundle: ServedBundle, settings: ServeSettings) -> Runner`, which `hstu-opt serve
--runner NAME` calls (hstu_opt/serve/server.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class RankInput:
    """One user's ranking request, already validated and normalized.

    History arrays hold the kept (most recent) rows, oldest first; all have the same length H >= 1.
    """

    user_id: str | None
    item_ids: np.ndarray  # [H] int64, each in 1..num_items
    ratings: np.ndarray  # [H] int64 (zeros when the request had none)
    timestamps: np.ndarray  # [H] int64 seconds, >= 0
    candidates: np.ndarray  # [M] int64, M >= 1, each in 1..num_items
    query_time: int  # seconds, already floored to serving.time_granularity_s
    contextual_ids: np.ndarray | None  # [C] int64, or None when the model has no contextual rows
    truncated: bool  # True when older history rows were dropped to fit the bundle's limit
    # a request by history_ref: the cache key it names (the history arrays are then empty, H = 0; only a
    # runner whose history_refs() is True gets one)
    ref: tuple | None = None


@dataclass
class RankOutput:
    probs: np.ndarray  # [M, T] float32, rows in the candidate order given, columns in task order
    cache: str  # "hit" | "miss" | "off"
    timing_ms: dict[str, float] = field(default_factory=dict)
    finished: float = 0.0  # time.perf_counter() when the runner's thread finished it (0: not known)
    history_ref: str | None = None  # the token naming this history's cache entry, when it is cached


@dataclass(frozen=True)
class RetrieveInput:
    """One user's retrieval request (same normalization as RankInput, without candidates)."""

    user_id: str | None
    item_ids: np.ndarray  # [H] int64
    ratings: np.ndarray  # [H] int64
    timestamps: np.ndarray  # [H] int64
    query_time: int  # floored
    contextual_ids: np.ndarray | None  # [C] int64 or None
    truncated: bool


class Runner(ABC):
    """Runs requests against one loaded engine. One instance per server process."""

    name: str  # "native" | "vllm"
    engine: str  # the engine actually serving: "eager" | "onnxruntime" | "compiled" | ...

    @abstractmethod
    async def start(self) -> None:
        """Load and warm the engine; after it returns, ready() is True."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop admitting work, finish everything already admitted, release the engine."""

    def draining(self) -> None:
        """The server has stopped taking connections and waits for the requests in flight: run queued
        work now rather than waiting for batches to fill. (Called before stop(); default: nothing.)"""

    @abstractmethod
    async def rank(self, req: RankInput) -> RankOutput:
        """Task probabilities for every candidate. Raises QueueFull when it cannot admit the request."""

    @abstractmethod
    async def retrieve(self, req: RetrieveInput) -> np.ndarray:
        """The user's query embedding, [D] float32 (the routes do the item-table top-k)."""

    @abstractmethod
    def ready(self) -> bool:
        """True once the engine is loaded and warmed, False again once stop() began."""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able summary for GET /v1/model: runner, engine, why this engine, cache settings."""

    def history_refs(self) -> bool:
        """Whether rank requests may name a cached history by reference (RankInput.ref) instead of sending it."""
        return False


class Unavailable(Exception):
    """The runner does not take work now (still loading, or draining for shutdown); the route answers 503."""

    def __init__(self, why: str, retry_after_s: float = 1):
        super().__init__(why)
        self.retry_after_s = retry_after_s


class HistoryRefGone(Exception):
    """A rank request named a cached history (history_ref) that the cache no longer holds; the route
    answers 409 and the client sends the history again."""


class QueueFull(Exception):
    """The runner's queue is at capacity; the route answers 503 with Retry-After."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"request queue is full; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s
