"""bench: latency (p50/p95/p99) and throughput of the ranking path over the recipe's grid of
batch size x history length x candidates, for PyTorch eager (the reference) and every engine built
that can run on this machine. Writes bench.json (rows + machine info), bench.md and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from hstu_opt import toolchain
from hstu_opt.backends import onnxruntime as ort_backend
from hstu_opt.backends.eager import EagerRunner, graph_module
from hstu_opt.data.requests import random_requests
from hstu_opt.errors import StageError
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.model.checkpoint import load_checkpoint
from hstu_opt.stages.base import Stage, StageContext


def check_grid(grid: list[tuple[int, int, int]], limits: dict) -> None:
    for i, (axis, key) in enumerate((("batch_sizes", "batch"), ("history_lengths", "history"),
                                     ("candidates", "candidates"))):
        lo, hi = limits[key]
        bad = sorted({g[i] for g in grid if not lo <= g[i] <= hi})
        if bad:
            raise StageError(f"bench.{axis} has {bad}, outside the exported graph's {key} range [{lo}, {hi}]: fix the recipe")


def time_runner(run: Callable[[dict], object], feed: dict, warmup: int, repeats: int) -> np.ndarray:
    for _ in range(warmup):
        run(feed)
    times = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        run(feed)
        times[i] = time.perf_counter() - t0
    return times * 1e3


def summarize(backend: str, batch: int, hist: int, cand: int, ms: np.ndarray) -> dict:
    p50 = float(np.percentile(ms, 50))
    return {"backend": backend, "batch": batch, "history": hist, "candidates": cand, "p50_ms": p50,
            "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "users_per_s": batch / p50 * 1e3, "candidates_per_s": batch * cand / p50 * 1e3, "repeats": len(ms)}


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info() -> dict:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "toolchain": toolchain.toolchain()}


def _eager(rows: list[dict], r: dict) -> float:
    return next(e["users_per_s"] for e in rows if e["backend"] == "eager" and
                (e["batch"], e["history"], e["candidates"]) == (r["batch"], r["history"], r["candidates"]))


def markdown(rows: list[dict], skipped: dict[str, str], machine: dict) -> str:
    lines = [f"# Benchmark ({machine['date_utc']})", "", f"CPU: {machine['cpu']} ({machine['cores']} cores); "
             f"torch {machine['toolchain']['torch']}, onnxruntime {machine['toolchain']['onnxruntime']}", "",
             "| backend | batch | history | candidates | p50 ms | p95 ms | p99 ms | users/s | x eager |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = r["users_per_s"] / _eager(rows, r)
        lines.append(f"| {r['backend']} | {r['batch']} | {r['history']} | {r['candidates']} | {r['p50_ms']:.2f} | "
                     f"{r['p95_ms']:.2f} | {r['p99_ms']:.2f} | {r['users_per_s']:.1f} | {ratio:.2f} |")
    for name, why in skipped.items():
        lines += ["", f"- **{name}** not benchmarked: {why}"]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for hist, cand in sorted({(r["history"], r["candidates"]) for r in rows}):
        sub = [r for r in rows if r["history"] == hist and r["candidates"] == cand]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for backend in dict.fromkeys(r["backend"] for r in sub):
            pts = sorted((r["batch"], r["p50_ms"], r["p99_ms"], r["users_per_s"]) for r in sub if r["backend"] == backend)
            b = [p[0] for p in pts]
            ax1.errorbar(b, [p[1] for p in pts], yerr=[[0] * len(pts), [p[2] - p[1] for p in pts]], marker="o",
                         capsize=3, label=backend)
            ax2.plot(b, [p[3] for p in pts], marker="o", label=backend)
        for ax, ylabel in ((ax1, "latency p50 ms (bar to p99)"), (ax2, "throughput users/s")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        ax2.legend()
        fig.suptitle(f"ranking: history {hist}, {cand} candidates")
        fig.tight_layout()
        name = f"bench_h{hist}_c{cand}.png"
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        files.append(name)
    return files


class Bench(Stage):
    name = "bench"
    version = 2  # 2: compact terminal table
    sections = ("bench",)
    inputs = ("train-stub", "export-onnx", "build-engine")

    def run(self, ctx: StageContext) -> dict:
        recipe, section = ctx.recipe, ctx.recipe.bench
        threads = recipe.engine.intra_op_threads
        torch.set_num_threads(threads)
        model, _ = load_checkpoint(ctx.inputs["train-stub"] / "checkpoint", expect=recipe.model)
        runners, skipped = self._runners(ctx, model)
        grid = section.grid()
        check_grid(grid, json.loads((ctx.inputs["export-onnx"] / "contract.json").read_text())["limits"])
        rng = np.random.default_rng(recipe.train.seed)
        rows = []
        with ctx.reporter.task("bench", len(grid) * len(runners)) as advance:
            for b, h, c in grid:
                req = random_requests(rng, b, h, c, num_items=model.cfg.num_items, contextual_len=model.cfg.contextual_len,
                                      contextual_cardinality=model.cfg.contextual_cardinality, exact=True)
                feed = req.ranking_feed()
                for name, run in runners.items():
                    rows.append(summarize(name, b, h, c, time_runner(run, feed, section.warmup, section.repeats)))
                    advance(1)
        machine = machine_info()
        write_json_atomic(ctx.out_dir / "bench.json", {"rows": rows, "skipped": skipped, "machine": machine,
                                                       "threads": threads, "graph": "ranking"})
        (ctx.out_dir / "bench.md").write_text(markdown(rows, skipped, machine))
        plots = plot(rows, ctx.out_dir)
        return {"rows": rows, "skipped": skipped, "plots": plots, "headline": self._headline(rows),
                "tables": [{"title": "bench: ranking latency and throughput (full table: bench.md)",
                            "columns": ["backend", "B", "hist", "cand", "p50 ms", "p99 ms", "users/s", "x eager"],
                            "rows": [[r["backend"], r["batch"], r["history"], r["candidates"], round(r["p50_ms"], 2),
                                      round(r["p99_ms"], 2), round(r["users_per_s"], 1),
                                      round(r["users_per_s"] / _eager(rows, r), 2)] for r in rows]}]}

    @staticmethod
    def _runners(ctx: StageContext, model) -> tuple[dict[str, Callable], dict[str, str]]:
        runners: dict[str, Callable] = {"eager": EagerRunner(graph_module(model, "ranking"), "ranking").run}
        skipped = {}
        engines = json.loads((ctx.inputs["build-engine"] / "engines.json").read_text())
        for name in engines.get("onnxruntime", {}):
            if name.startswith("ranking."):
                sess = ort_backend.load(ctx.inputs["build-engine"] / "onnxruntime", name)
                runners[f"onnxruntime.{name.split('.', 1)[1]}"] = lambda feed, s=sess: ort_backend.run(s, feed)
        if "ranking" in engines.get("aoti", {}):
            from hstu_opt.backends import aoti

            runners["aoti"] = aoti.load(ctx.inputs["build-engine"] / "aoti", "ranking").run
        if "ranking" in engines.get("compiled", {}):
            from hstu_opt.backends import compiled

            runners["compiled"] = compiled.load(ctx.inputs["build-engine"] / "compiled").run
        for name, desc in engines.get("tensorrt", {}).items():
            skipped[f"tensorrt.{name}"] = desc.get("skipped") or (
                f"plan for {desc['target']} built; running it needs a GPU of that compute capability, which this "
                "machine does not have")
        return runners, skipped

    @staticmethod
    def _headline(rows: list[dict]) -> str:
        big = max(r["batch"] for r in rows)
        at = {r["backend"]: r["users_per_s"] for r in rows if r["batch"] == big}
        eager = at.pop("eager")
        return f"batch {big}: " + ", ".join(f"{k} {v / eager:.2f}x eager" for k, v in at.items())
