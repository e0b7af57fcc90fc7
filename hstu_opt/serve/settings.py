"""The server's settings (the `hstu-opt serve` options), shared by the CLI, the server and runner factories."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from hstu_opt.errors import ServeError
from hstu_opt.serve.kv_cache.paged import DEFAULT_PAGE_ROWS
from hstu_opt.serve.kv_cache.policy import POLICIES
from hstu_opt.serve.scheduler import BatchPolicy

ENGINES = ("auto", "compiled", "onnxruntime", "eager")
RUNNERS = ("native", "vllm")
# uvicorn's event loop and HTTP/1.1 parser (its --loop / --http): auto takes uvloop and httptools when they are
# installed (the serve extra installs both), else asyncio and h11, which cost more per request
LOOPS = ("auto", "asyncio", "uvloop")
HTTP_PARSERS = ("auto", "h11", "httptools")


@dataclass(frozen=True)
class ServeSettings:
    bundle: Path
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the startup line prints the one taken)
    engine: str = "auto"
    runner: str = "native"
    max_batch: int = 32
    max_wait_ms: float = 0.0
    max_queue: int = 1024
    cache_gb: float = 1.0  # 0 turns the user cache off
    max_body_mb: float = 1.0
    torch_threads: int = 0  # torch intra-op threads of the server process (0: torch's default)
    cache_policy: str = "predictive"  # eviction policy: one of POLICIES
    host_cache_gb: float | None = None  # the paged cache's host tier (None: as large as cache_gb; 0: none)
    cache_page_rows: int = DEFAULT_PAGE_ROWS  # rows per page of the paged cache (kv_cache/paged.py's rule)
    cache_prefetch_s: float = 0.0  # the predictive policy's prefetch horizon (0: no prefetch)
    loop: str = "auto"  # one of LOOPS
    http: str = "auto"  # one of HTTP_PARSERS
    inline_lone: bool | None = None  # a lone request runs on the event loop's thread (Scheduler.run_now);
    # None: runners.native.inline_rule (auto: only requests whose engine call replays a captured CUDA graph)

    def __post_init__(self) -> None:
        for option, value, allowed in (("--engine", self.engine, ENGINES), ("--runner", self.runner, RUNNERS),
                                       ("--cache-policy", self.cache_policy, POLICIES), ("--loop", self.loop, LOOPS),
                                       ("--http", self.http, HTTP_PARSERS)):
            if value not in allowed:
                raise ServeError(f"{option} {value!r}: choose one of {', '.join(allowed)}")
        for option, value in (("--loop", self.loop), ("--http", self.http)):
            if value in ("uvloop", "httptools") and importlib.util.find_spec(value) is None:
                raise ServeError(f"{option} {value}: {value} is not installed: pip install 'hstu-opt[serve]', "
                                 f"or pass {option} auto")
        for option, value, least in (("--port", self.port, 0), ("--max-batch", self.max_batch, 1),
                                     ("--max-wait-ms", self.max_wait_ms, 0), ("--max-queue", self.max_queue, 1),
                                     ("--cache-gb", self.cache_gb, 0), ("--max-body-mb", self.max_body_mb, 0.001),
                                     ("--torch-threads", self.torch_threads, 0), ("--cache-page-rows", self.cache_page_rows, 1),
                                     ("--host-cache-gb", self.host_cache_gb or 0, 0),
                                     ("--cache-prefetch-s", self.cache_prefetch_s, 0)):
            if value < least:
                raise ServeError(f"{option} {value}: must be at least {least}")
        if self.cache_prefetch_s and self.cache_policy != "predictive":
            raise ServeError(f"--cache-prefetch-s {self.cache_prefetch_s:g}: prefetching needs --cache-policy "
                             f"predictive (lru predicts no returns); drop it or switch the policy")
        if self.port > 65535:
            raise ServeError(f"--port {self.port}: must be at most 65535")

    @property
    def loop_used(self) -> str:
        """The event loop uvicorn runs with these settings (auto: uvloop when installed)."""
        return _resolve(self.loop, "uvloop", "asyncio")

    @property
    def http_used(self) -> str:
        """uvicorn's HTTP/1.1 parser with these settings (auto: httptools when installed)."""
        return _resolve(self.http, "httptools", "h11")

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gb * 2**30)

    @property
    def host_cache_bytes(self) -> int:
        return self.cache_bytes if self.host_cache_gb is None else int(self.host_cache_gb * 2**30)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    @property
    def batching(self) -> BatchPolicy:
        return BatchPolicy(max_batch=self.max_batch, max_wait_s=self.max_wait_ms / 1e3, max_queue=self.max_queue,
                           inline_lone=self.inline_lone)


def _resolve(choice: str, fast: str, default: str) -> str:
    """An --loop/--http choice as uvicorn gets it: auto is `fast` when that package is installed, else `default`."""
    return choice if choice != "auto" else (fast if importlib.util.find_spec(fast) else default)
