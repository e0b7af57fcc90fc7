"""`hstu-opt serve`: open the bundle, choose the engine, build the runner and app, and run uvicorn until
SIGINT/SIGTERM; then stop taking connections, let in-flight requests finish, drain the runner, return.

Imports fastapi and uvicorn (the `serve` extra); the CLI imports this module only inside its command.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import signal
import socket
import threading
from collections.abc import Callable

from hstu_opt._lazy import require
from hstu_opt.errors import ServeError
from hstu_opt.serve.engines import choose_engine, gpu_name
from hstu_opt.serve.runners.base import Runner
from hstu_opt.serve.served_bundle import ServedBundle
from hstu_opt.serve.settings import ServeSettings

Announce = Callable[[str], None]

for _module in ("fastapi", "uvicorn", "prometheus_client"):
    require(_module, backend="serve", extra="serve")

import uvicorn  # noqa: E402

from hstu_opt.serve.app import create_app  # noqa: E402
from hstu_opt.serve.metrics import ServeMetrics  # noqa: E402
from hstu_opt.serve.retrieval import ItemIndex  # noqa: E402


def build(settings: ServeSettings, announce: Announce):
    """-> (FastAPI app, runner). Raises HstuOptError for anything the user can fix."""
    bundle = ServedBundle.open(settings.bundle)
    if settings.torch_threads:
        set_torch_threads(settings.torch_threads)
    metrics = ServeMetrics()
    runner = make_runner(bundle, settings, metrics)
    announce(f"hstu-opt serve: {bundle.name} {bundle.version}, runner {runner.name}, engine {runner.engine}")
    describe = runner.describe()
    if "engine_reason" in describe:
        announce(f"  engine: {describe['engine_reason']}")
        announce(f"  rule:   {describe['engine_rule']}")
    cache = describe.get("cache", {})
    if cache.get("enabled"):
        prefetch = f", prefetch within {settings.cache_prefetch_s:g} s" if settings.cache_prefetch_s else ""
        announce(f"  cache:  on, {settings.cache_gb:g} GB pool ({cache.get('pool')}) + {settings.host_cache_bytes / 2**30:g} "
                 f"GB host tier, pages of {settings.cache_page_rows} rows, {cache.get('policy')}{prefetch}")
    else:
        announce(f"  cache:  off ({cache.get('why', 'runner has none')})")
    if "inline_lone_reason" in describe.get("batching", {}):
        announce(f"  lone requests inline: {describe['batching']['inline_lone_reason']}")
    return create_app(runner, bundle, ItemIndex(bundle.item_table()), metrics, settings.max_body_bytes), runner


def set_torch_threads(n: int) -> None:
    """Process-wide: on a small or shared CPU, fewer intra-op threads than cores keep OpenMP's spinning
    threads from fighting the event loop and other processes (2 threads on a busy 2-core machine ran the
    tiny model's prefill 80x slower than 1 thread: 190 against 2.3 ms)."""
    import torch

    torch.set_num_threads(n)


def make_runner(bundle: ServedBundle, settings: ServeSettings, metrics: ServeMetrics) -> Runner:
    if settings.runner == "native":
        from hstu_opt.serve.runners.native import NativeRunner

        choice = choose_engine(bundle, settings.engine, settings.cache_bytes > 0, gpu_name())
        runner = NativeRunner(bundle, choice, settings.cache_bytes, settings.batching, on_batch=metrics.observe_batch,
                              on_depth=metrics.queue_depth.set, cache_policy=settings.cache_policy,
                              host_cache_bytes=settings.host_cache_bytes, page_rows=settings.cache_page_rows,
                              alone=metrics.alone, prefetch_s=settings.cache_prefetch_s)
        metrics.watch_cache(runner.cache_stats, settings.cache_bytes if runner.store else 0)
        return runner
    try:
        module = importlib.import_module(f"hstu_opt.serve.runners.{settings.runner}")
    except ModuleNotFoundError as exc:
        if exc.name != f"hstu_opt.serve.runners.{settings.runner}":
            raise
        raise ServeError(f"--runner {settings.runner}: this build has no hstu_opt/serve/runners/{settings.runner}.py; "
                         "use --runner native") from None
    return module.create_runner(bundle, settings)


def listen(host: str, port: int) -> socket.socket:
    """Bind before serving, so a taken port is a one-line error (and port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP. Without it a
    # keep-alive client waited out a delayed ACK (~40 ms) between the response's header and body writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another --port or --host") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, announcing the URL once serving, and exiting normally after a signal."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket, announce: Announce, runner: Runner):
        super().__init__(config)
        self.sock, self.announce, self.runner = sock, announce, runner

    async def startup(self, sockets=None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's answer to a failed lifespan startup; serve() reports why
            self.should_exit = True
            return
        if self.started:
            c = self.config
            self.announce(f"serving on {url_of(self.sock)} (API docs: {url_of(self.sock)}/docs; event loop {c.loop}, "
                          f"HTTP parser {c.http}); Ctrl-C or SIGTERM stops after the requests in flight")

    async def shutdown(self, sockets=None) -> None:
        self.announce("stopping: no new connections; finishing the requests in flight")
        self.runner.draining()  # in-flight requests must not wait for batches that will not fill
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own version re-raises the signal after its graceful shutdown, so the process would
        # end by SIGTERM (or KeyboardInterrupt); after a clean drain this server exits 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        saved = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)


def uvicorn_config(app, settings: ServeSettings) -> uvicorn.Config:
    """The server's uvicorn configuration (the tests' in-process servers use it too)."""
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=None,
                          loop=settings.loop_used, http=settings.http_used)


def serve(settings: ServeSettings, announce: Announce) -> None:
    app, runner = build(settings, announce)
    sock = listen(settings.host, settings.port)
    _log_to_stderr()
    server = Server(uvicorn_config(app, settings), sock, announce, runner)
    server.run(sockets=[sock])
    if not server.started:
        raise getattr(app.state, "start_error", None) or ServeError("the server did not start: see the log above")
    announce("stopped")


def _log_to_stderr() -> None:
    log = logging.getLogger("hstu_opt.serve")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
