"""Loopback load test of `hstu-opt serve`: starts the server on 127.0.0.1 (a free port), sends a bounded
number of /v1/rank requests at each concurrency, and reports served latency (p50/p90/p99) and requests/s,
next to the engine's own latency for the same request shape measured in this process first.

    python benchmarks/serve_load.py --bundle artifacts/tiny/1                     # CPU: 2,000 requests at 32
    python benchmarks/serve_load.py --bundle B --engine compiled --cache-gb 0 \\
        --concurrency 1,16,64 --history 4096 --candidates 256                     # GPU: the compiled engine

Request bodies are encoded once per pool user before the clock starts (a load generator's own JSON
encoding is not the server's latency); --arrays packed sends the integer lists in the packed form
(base64 of little-endian int64), --arrays binary as a binary body (the JSON, then the arrays raw; both in
docs/serving.md); --results-layout columns | packed asks for the
columnar or the packed response (results_layout, docs/serving.md). The client decodes every response and counts its scored
candidates (a wrong count is an error). Each row reports three latencies: as the client saw them; the
server's whole request (its Server-Timing header: body received to response encoded); and the route's
own phases (timing_ms: input, queue, batch, total).

Each request goes out in one write, headers and body together (--http-client raw, the default: a small
keep-alive HTTP/1.1 client here, as RankClient's http.client does). httpx (--http-client httpx) writes the
headers and the body apart, and the server, which starts on the headers, waits for this client's Python to
send the body: inside the whole request (Server-Timing), not the route's phases (the middleware reads the
body before the route runs). On an H100 host the whole request was 1.55 against 1.62 ms and the client's
round trip 2.06 against 3.39 ms, the route's phases the same (serve_load_dlrm-v3_h100_2026-12-05_run89_binary
and _run90_httpx.json).

Requests come from a fixed pool of --users synthetic users (ids, ratings, timestamps within the bundle's
limits), drawn at random, so a user repeats (cache hits when the cache is on); --history and --candidates
fix the sizes (default: random history lengths up to max_history_len, max_targets candidates).
The engine row times the path the server uses for a request that misses: a full forward over the padded
rows (cache off, or onnxruntime), or prefill + cached scoring (eager/compiled with the cache on), at
batch 1 and at min(concurrency, --max-batch) users.

Stops by itself: --requests per concurrency and --max-seconds overall. Exits 1 if any request failed.
Needs only what `hstu-opt[serve]` installs (fastapi, uvicorn, pydantic, prometheus-client, httpx).
Writes JSON (date, machine, versions, settings, rows) to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata as md
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hstu_opt import toolchain  # noqa: E402
from hstu_opt.serve.client import encode_request, unpack_results  # noqa: E402
from hstu_opt.serve.engines import Row, choose_engine, gpu_name, load_adapter, uses_cached_path  # noqa: E402
from hstu_opt.serve.requests import rank_input  # noqa: E402
from hstu_opt.serve.schemas import RankRequest  # noqa: E402
from hstu_opt.serve.served_bundle import ServedBundle  # noqa: E402
from hstu_opt.serve.server import set_torch_threads  # noqa: E402

SERVE_PACKAGES = ("fastapi", "starlette", "uvicorn", "pydantic", "prometheus-client", "httpx")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per concurrency")
    ap.add_argument("--concurrency", default="32", help="comma-separated, e.g. 1,16,64")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--runner", default="native", help="native or vllm (then pass --engine-repeats 0: the engine "
                                                       "row times the native path)")
    ap.add_argument("--cache-gb", type=float, default=1.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=0.0)
    ap.add_argument("--torch-threads", type=int, default=0, help="passed to the server (0: torch's default)")
    ap.add_argument("--users", type=int, default=256, help="size of the synthetic user pool")
    ap.add_argument("--history", type=int, default=0, help="history rows per user (0: random 1..max_history_len)")
    ap.add_argument("--candidates", type=int, default=0, help="candidates per request (0: max_targets)")
    ap.add_argument("--arrays", choices=("list", "packed", "binary"), default="list",
                    help="integer lists as JSON lists, packed (base64 of little-endian int64), or raw int64 after "
                         "the JSON (a binary body, Inference-Header-Content-Length)")
    ap.add_argument("--results-layout", choices=("items", "columns", "packed"), default="items",
                    help="the results_layout every request asks for: one object per candidate, one list per field, "
                         "or the lists as base64 arrays")
    ap.add_argument("--engine-repeats", type=int, default=30, help="timed engine calls per batch size (0: skip)")
    ap.add_argument("--engine-gap-ms", type=float, default=2.0, help="batch 1 is also timed with this idle gap before "
                    "each call, as a served request at concurrency 1 finds the host (0: back to back only)")
    ap.add_argument("--max-seconds", type=float, default=600, help="hard bound on the whole run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inline-lone", choices=("auto", "on", "off"), default="auto", help="serve --inline-lone / "
                    "--no-inline-lone (auto: the server's rule, graph replays only)")
    ap.add_argument("--client-procs", type=int, default=0, help="client processes per concurrency level (0: one per "
                    "8 concurrent requests, at most half the cores): one Python client caps what it can measure")
    ap.add_argument("--history-ref", action="store_true", help="after a user's first answer, send that user's "
                    "history_ref instead of the history (a 409, the entry gone, resends the history)")
    ap.add_argument("--http-client", choices=("raw", "httpx"), default="raw", help="raw: each request in one write "
                    "(headers and body together); httpx: httpx.AsyncClient, which writes them apart")
    ap.add_argument("--loop", default="auto", help="the server's event loop (serve --loop)")
    ap.add_argument("--http", default="auto", help="the server's HTTP parser (serve --http)")
    return ap.parse_args()


# ---- requests ---------------------------------------------------------------------------------------
def user_pool(bundle: ServedBundle, args: argparse.Namespace) -> list[dict]:
    cfg, rng = bundle.cfg, np.random.default_rng(args.seed)
    n_cand = args.candidates or cfg.max_targets
    pool = []
    for u in range(args.users):
        n = args.history or int(rng.integers(1, cfg.max_history_len + 1))
        ts = np.sort(rng.integers(1_600_000_000, 1_700_000_000, n))
        body = {"user_id": f"user{u}",
                "history": {"item_ids": rng.integers(1, cfg.num_items + 1, n).tolist(),
                            "ratings": rng.integers(1, cfg.num_ratings + 1, n).tolist(), "timestamps": ts.tolist()},
                "candidates": rng.integers(1, cfg.num_items + 1, n_cand).tolist(), "query_time": int(ts[-1]) + 30}
        if cfg.contextual_len:
            body["contextual_ids"] = rng.integers(1, cfg.contextual_cardinality + 1, cfg.contextual_len).tolist()
        pool.append(body)
    return pool


def encoded(body: dict, arrays: str, results_layout: str) -> tuple[bytes, dict[str, str]]:
    """The request as sent (body, headers): JSON lists, packed (base64) arrays, or a binary body."""
    return encode_request({**body, "results_layout": results_layout}, arrays)


class Bodies:
    """The request bodies per pool user: the whole request, or (history_ref) the user's reference once an
    answer gave one; a 409 (entry gone) goes back to the whole request."""

    def __init__(self, pool: list[dict], args: argparse.Namespace):
        self.full = [encoded(b, args.arrays, args.results_layout) for b in pool]
        self.pool, self.args, self.by_ref, self.gone = pool, args, {}, 0

    def body(self, i: int) -> tuple[bytes, dict[str, str]]:
        return self.by_ref.get(i) or self.full[i]

    def answered(self, i: int, status: int, reply: dict | None) -> None:
        if not self.args.history_ref:
            return
        if status == 409:
            self.by_ref.pop(i, None)
            self.gone += 1
        elif reply is not None and reply.get("history_ref") and i not in self.by_ref:
            b = self.pool[i]
            self.by_ref[i] = encoded({"user_id": b["user_id"], "history_ref": reply["history_ref"],
                                      "candidates": b["candidates"]}, self.args.arrays, self.args.results_layout)


def scored(reply: dict) -> int:
    """How many candidates a rank response holds, in any results layout (packed: decoded, as a client would)."""
    if "packed" in reply:
        return len(unpack_results(reply["packed"])[0])
    return len(reply["columns"]["item_id"]) if "columns" in reply else len(reply["results"])


# ---- the engine alone -------------------------------------------------------------------------------
def engine_latency(bundle: ServedBundle, args: argparse.Namespace, pool: list[dict], batches: list[int]) -> list[dict]:
    """Time the engine path a missing request takes, in this process, before the server starts."""
    if args.torch_threads:
        set_torch_threads(args.torch_threads)  # as the server will
    choice = choose_engine(bundle, args.engine, args.cache_gb > 0, gpu_name())
    adapter = load_adapter(bundle, choice)
    adapter.warm_up()
    cached = uses_cached_path(adapter, args.cache_gb > 0)
    users = [rank_input(RankRequest.model_validate(b), bundle.limits) for b in pool]
    rows = []
    for b in batches:
        batch = users[:b]

        def call():
            if cached:
                adapter.score_cached(adapter.prefill(batch), [u.candidates for u in batch])
            else:
                adapter.rank_full([Row(u, u.candidates) for u in batch])

        for _ in range(3):
            call()
        for gap_ms in (0.0, *((args.engine_gap_ms,) if b == 1 and args.engine_gap_ms > 0 else ())):
            ms = []
            for _ in range(args.engine_repeats):
                if gap_ms:
                    time.sleep(gap_ms / 1e3)
                t0 = time.perf_counter()
                call()
                ms.append((time.perf_counter() - t0) * 1e3)
            rows.append({"engine": choice.label, "path": "prefill+score_cached" if cached else "full forward",
                         "batch": b, **({"gap_ms": gap_ms} if gap_ms else {}), **percentiles(np.array(ms))})
    del adapter
    _free_gpu()
    return rows


def _free_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the server ---------------------------------------------------------------------------------------
def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, dict]:
    """The server process, its URL, and the event loop and HTTP parser its startup line names."""
    cmd = [sys.executable, "-m", "hstu_opt", "serve", str(args.bundle), "--port", "0", "--runner", args.runner,
           "--engine", args.engine,
           "--cache-gb", str(args.cache_gb), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
           "--max-body-mb", "64", "--torch-threads", str(args.torch_threads), "--loop", args.loop, "--http", args.http]
    cmd += {"auto": [], "on": ["--inline-lone"], "off": ["--no-inline-lone"]}[args.inline_lone]
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        print("  server:", line.rstrip())
        if m := re.search(r"serving on (http://\S+)", line):
            stack = re.search(r"event loop (\w+), HTTP parser (\w+)", line)
            return proc, m.group(1), {"loop": stack.group(1), "http": stack.group(2)} if stack else {}
    raise SystemExit(f"the server exited ({proc.wait()}) before serving")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        rest, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return -9
    for line in (rest or "").splitlines():
        print("  server:", line)
    return proc.returncode


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def server_counters(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    names = {"cache_hits": "hstu_serve_cache_hits_total", "cache_misses": "hstu_serve_cache_misses_total",
             "batches": 'hstu_serve_batch_size_count{kind="rank"}', "batched": 'hstu_serve_batch_size_sum{kind="rank"}'}
    return {k: metric(text, n) for k, n in names.items()}


# ---- load -----------------------------------------------------------------------------------------------
@dataclass
class Load:
    latencies_ms: list[float]  # as the client saw them
    server_ms: list[float]  # the route's own time (timing_ms.total): parse, queue, batch, format
    whole_ms: list[float]  # the whole request in the server (Server-Timing): + body read and response encoding
    phases: dict[str, list[float]]  # timing_ms per phase
    statuses: dict[str, int]
    started: float  # time.time() (comparable across client processes)
    ended: float
    by_reference_users: int = 0  # (--history-ref) users whose requests went by reference, per client process
    references_gone: int = 0
    by_cache: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # cache status -> client / route ms

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Http1:
    """One keep-alive HTTP/1.1 connection that writes each request whole: the request line, headers and body
    in one write (--http-client raw). Reads responses with a Content-Length or chunked; reconnects after a
    response that closes the connection. Enough for this server, not a general client."""

    def __init__(self, url: str, timeout: float):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.timeout = host, int(port or 80), timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.wait_for(self._post(path, body, headers), self.timeout)

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-length: {len(body)}\r\n"
                          f"{head}\r\n".encode("latin-1") + body)
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        reply: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            reply[name.strip().lower()] = value.strip()
        if "content-length" in reply:
            content = await self.reader.readexactly(int(reply["content-length"]))
        elif reply.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while size := int((await self.reader.readline()).split(b";")[0], 16):
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            content = b"".join(parts)
        else:
            raise ConnectionError(f"a response with neither content-length nor chunked encoding ({status})")
        if reply.get("connection", "").lower() == "close":
            await self.close()
        return status, reply, content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def post_httpx(client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]):
    r = await client.post(path, content=body, headers=headers)
    return r.status_code, r.headers, r.content


def server_timing(header: str | None) -> float | None:
    m = re.search(r"total;dur=([0-9.]+)", header or "")
    return float(m.group(1)) if m else None


async def load(url: str, pool: Bodies, candidates: int, n: int, concurrency: int, rng: np.random.Generator,
               deadline: float) -> Load:
    order = rng.integers(0, len(pool.full), n).tolist()
    latencies: list[float] = []
    server: list[float] = []
    whole: list[float] = []
    phases: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    by_cache: dict[str, dict[str, list[float]]] = {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            conn = Http1(url, 120) if pool.args.http_client == "raw" else None
            while order and time.monotonic() < deadline:
                user = order.pop()
                body, headers = pool.body(user)
                t0 = time.perf_counter()
                try:
                    if conn is not None:
                        code, reply_headers, content = await conn.post("/v1/rank", body, headers)
                    else:
                        code, reply_headers, content = await post_httpx(client, "/v1/rank", body, headers)
                    status = str(code)
                except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                    code, status = None, type(exc).__name__
                    if conn is not None:
                        await conn.close()
                took = (time.perf_counter() - t0) * 1e3
                reply = json.loads(content) if status == "200" else None
                if code is not None:
                    pool.answered(user, code, reply)
                if status == "409" and pool.args.history_ref:  # the entry is gone: the history again (not timed)
                    order.append(user)
                    continue
                latencies.append(took)
                if status == "200" and scored(reply) != candidates:
                    status = "wrong_count"  # (the server answered, but not with every candidate)
                if status == "200":
                    timing = reply["timing_ms"]
                    server.append(timing["total"])
                    for k, v in timing.items():
                        phases.setdefault(k, []).append(v)
                    per = by_cache.setdefault(reply["cache"], {"client": [], "route": []})
                    per["client"].append(took)
                    per["route"].append(timing["total"])
                    if (w := server_timing(reply_headers.get("server-timing"))) is not None:
                        whole.append(w)
                statuses[status] = statuses.get(status, 0) + 1
            if conn is not None:
                await conn.close()

        t0 = time.time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Load(latencies, server, whole, phases, statuses, t0, time.time(), len(pool.by_ref), pool.gone, by_cache)


def client_procs(args: argparse.Namespace, concurrency: int) -> int:
    """Client processes for a level: --client-procs, or one per 8 concurrent requests (at most half the cores).
    One Python process's client tops out at a few hundred 134 KB requests/s; past that a level would time
    the client (H200 run 82: concurrency 64 from one process, client p50 427 ms, the server's whole request 11 ms)."""
    auto = min(-(-concurrency // 8), max(1, (os.cpu_count() or 2) // 2))
    return max(1, min(args.client_procs or auto, concurrency))


_CLIENT: dict = {}  # a client process's (url, bodies, candidates, start barrier), set once by _client_init


def _client_init(url: str, pool: Bodies, candidates: int, barrier) -> None:
    _CLIENT.update(url=url, pool=pool, candidates=candidates, barrier=barrier)


def _client_load(n: int, concurrency: int, seed: int, deadline: float) -> Load:
    """One process's share of a level, started with every other process's (the barrier: a process still
    importing would otherwise start late and stretch the level's span; H200 run 84's concurrency-64 row
    reported 60 requests/s that way)."""
    c = _CLIENT
    c["barrier"].wait(timeout=300)
    return asyncio.run(load(c["url"], c["pool"], c["candidates"], n, concurrency, np.random.default_rng(seed), deadline))


def split(total: int, parts: int) -> list[int]:
    """total as `parts` near-equal shares (the first total % parts one larger)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def merged(loads: list[Load]) -> Load:
    """One level's processes as one load: every sample, and the span from the first start to the last end."""
    phases: dict[str, list[float]] = {}
    statuses: dict[str, int] = {}
    by_cache: dict[str, dict[str, list[float]]] = {}
    for ld in loads:
        for k, v in ld.phases.items():
            phases.setdefault(k, []).extend(v)
        for k, v in ld.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        for status, per in ld.by_cache.items():
            for k, v in per.items():
                by_cache.setdefault(status, {}).setdefault(k, []).extend(v)
    return Load([x for ld in loads for x in ld.latencies_ms], [x for ld in loads for x in ld.server_ms],
                [x for ld in loads for x in ld.whole_ms], phases, statuses, min(ld.started for ld in loads),
                max(ld.ended for ld in loads), sum(ld.by_reference_users for ld in loads),
                sum(ld.references_gone for ld in loads), by_cache)


def percentiles(ms: np.ndarray) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "n": int(ms.size)}


def run_level(url: str, pool: Bodies, candidates: int, args: argparse.Namespace, c: int, deadline: float) -> dict:
    procs = client_procs(args, c)
    if procs == 1:
        rng = np.random.default_rng(args.seed + c)
        asyncio.run(load(url, pool, candidates, 2 * c, c, rng, deadline))  # warm-up: connections, first batches
        before = server_counters(url)
        result = asyncio.run(load(url, pool, candidates, args.requests, c, rng, deadline))
    else:  # the level's concurrency and requests split over processes (spawned: this one may hold a GPU context)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(procs, initializer=_client_init, initargs=(url, pool, candidates, ctx.Barrier(procs))) as workers:
            # (each task waits at the barrier, so the procs tasks of a round run on procs distinct processes)
            seeds = [args.seed + 1000 * c + i for i in range(procs)]
            shares = split(c, procs)
            workers.starmap(_client_load, [(2 * k, k, s, deadline) for k, s in zip(shares, seeds)], chunksize=1)  # warm-up
            before = server_counters(url)
            n = split(args.requests, procs)
            result = merged(workers.starmap(_client_load, [(m, k, s + 1, deadline) for m, k, s in zip(n, shares, seeds)],
                                            chunksize=1))
    after = server_counters(url)
    delta = {k: after[k] - before[k] for k in after}
    errors = sum(v for k, v in result.statuses.items() if k != "200")
    by_ref = ({"by_reference_users": result.by_reference_users, "references_gone": result.references_gone}
              if args.history_ref else {})
    return {"concurrency": c, "client_procs": procs, "requests": len(result.latencies_ms), "errors": errors, "statuses": result.statuses,
            "requests_per_s": len(result.latencies_ms) / result.seconds, "seconds": result.seconds,
            **percentiles(np.array(result.latencies_ms)),
            **{f"server_{k}": v for k, v in percentiles(np.array(result.server_ms or [0.0])).items() if k != "n"},
            **{f"whole_{k}": v for k, v in percentiles(np.array(result.whole_ms or [0.0])).items() if k != "n"},
            "phase_p50_ms": {k: float(np.median(v)) for k, v in result.phases.items()},
            # hits and misses apart (a miss prefills the history: its latency is not a hit's)
            "by_cache": {status: {"n": len(per["client"]), **percentiles(np.array(per["client"])),
                                  **{f"server_{k}": v for k, v in percentiles(np.array(per["route"])).items() if k != "n"}}
                         for status, per in sorted(result.by_cache.items())},
            "mean_batch": delta["batched"] / delta["batches"] if delta["batches"] else 0.0,
            "cache_hits": int(delta["cache_hits"]), "cache_misses": int(delta["cache_misses"]), **by_ref}


# ---- report ---------------------------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "gpu": gpu_name(),
            "load_average_1m": os.getloadavg()[0]}  # (other work on the machine shows here)


def versions() -> dict:
    out = dict(toolchain.toolchain())
    for dist in SERVE_PACKAGES:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def table(rows: list[dict], engine_rows: list[dict]) -> str:
    lines = [f"{'concurrency':>11} {'requests':>8} {'errors':>6} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} "
             f"{'p99 ms':>8} {'whole50':>8} {'srv p50':>8} {'srv p99':>8} {'batch':>6} {'hits':>6} {'misses':>6}"]
    for r in rows:
        lines.append(f"{r['concurrency']:>11} {r['requests']:>8} {r['errors']:>6} {r['requests_per_s']:>8.1f} "
                     f"{r['p50_ms']:>8.2f} {r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['whole_p50_ms']:>8.2f} {r['server_p50_ms']:>8.2f} "
                     f"{r['server_p99_ms']:>8.2f} {r['mean_batch']:>6.1f} {r['cache_hits']:>6} {r['cache_misses']:>6}")
    lines.append("(p50/p90/p99: as the client saw them; whole50: the server's whole request, Server-Timing; "
                 "srv: the route's own time, timing_ms.total)")
    for r in rows:
        lines.append(f"c={r['concurrency']} route phases p50 (ms): " +
                     ", ".join(f"{k} {v:.3f}" for k, v in r["phase_p50_ms"].items()))
        if len(r["by_cache"]) > 1 or "off" not in r["by_cache"]:
            lines.append(f"c={r['concurrency']} by cache status: " + "; ".join(
                f"{st} n={b['n']} route p50 {b['server_p50_ms']:.3f} p99 {b['server_p99_ms']:.3f}, client p50 {b['p50_ms']:.2f}"
                for st, b in r["by_cache"].items()))
    for e in engine_rows:
        gap = f", {e['gap_ms']:g} ms idle before each" if e.get("gap_ms") else ""
        lines.append(f"engine alone ({e['engine']}, {e['path']}{gap}), batch {e['batch']}: p50 {e['p50_ms']:.2f} ms, "
                     f"p99 {e['p99_ms']:.2f} ms ({e['n']} calls)")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    deadline = time.monotonic() + args.max_seconds
    bundle = ServedBundle.open(args.bundle)
    pool = user_pool(bundle, args)
    bodies = Bodies(pool, args)
    levels = [int(c) for c in args.concurrency.split(",")]
    batches = sorted({1, *(min(c, args.max_batch) for c in levels)})
    engine_rows = engine_latency(bundle, args, pool, batches) if args.engine_repeats else []
    proc, url, http_stack = start_server(args)
    try:
        model = httpx.get(f"{url}/v1/model", timeout=30).json()
        rows = [run_level(url, bodies, len(pool[0]["candidates"]), args, c, deadline) for c in levels]
    finally:
        exit_code = stop_server(proc)
    report = {"benchmark": "serve_load", "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions(), "bundle": {"path": str(args.bundle), "name": bundle.name,
                                                                       "version": bundle.version},
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "server": model["runner"], "http_stack": http_stack, "server_exit_code": exit_code, "rows": rows,
              "engine_alone": engine_rows}
    print(table(rows, engine_rows))
    args.out.mkdir(parents=True, exist_ok=True)
    host = "gpu" if gpu_name() else "cpu"
    runner = ("" if args.runner == "native" else f"_{args.runner}") + (f"_{args.arrays}" if args.arrays != "list" else "")
    runner += (f"_{args.results_layout}" if args.results_layout != "items" else "") + ("_ref" if args.history_ref else "")
    runner += {"auto": "", "on": "_inline", "off": "_noinline"}[args.inline_lone]
    runner += "_httpx" if args.http_client == "httpx" else ""
    path = args.out / f"serve_load_{bundle.name}{runner}_{host}_{report['date_utc'][:10]}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    failed = sum(r["errors"] for r in rows) or sum(r["requests"] < args.requests for r in rows) or exit_code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
