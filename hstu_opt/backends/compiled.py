"""compiled: the jagged serving graph under torch.compile, shipped with Inductor's cache artifacts.

The GPU engine where AOTInductor packages cannot load (ENVIRONMENT.md: on the H200 image loading any
AOTInductor artifact segfaults). It compiles HstuModel.rank_jagged (the last layer runs for the
candidate rows only): on CUDA with the Triton ops, in the recipe's dtype, with CUDA graphs
(mode="reduce-overhead"); on a CPU machine with the reference ops through Inductor's C++ codegen,
which is what CI builds, loads and runs.

The engine directory stands alone:
  checkpoint/              the weights (safetensors) and config
  ranking.compiled.json    device, impl, dtype, limits, warmed shapes, versions, cold and warm start
  ranking.cache.bin        torch.compiler.save_cache_artifacts() of the cold compile

Cold and warm start are each measured in a fresh process with empty Inductor and Triton cache
directories, so the warm one can only be warm through the shipped artifacts; the warm process also
checks its outputs against the cold one's.

The runner takes the padded feed every engine takes, turns it into jagged rows on the host (one
host-to-device copy) and scatters the candidates' probabilities back to [B, Nc, T] (padding slots 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from hstu_opt import toolchain
from hstu_opt.backends.eager import check_feed, engine_limits, example_feed, input_names
from hstu_opt.errors import HstuOptError, StageError
from hstu_opt.fsutil import write_bytes_atomic, write_json_atomic
from hstu_opt.model.checkpoint import load_checkpoint, save_checkpoint
from hstu_opt.model.hstu import HstuModel
from hstu_opt.ops import Impl

NAME = "compiled"
META = "ranking.compiled.json"
CACHE = "ranking.cache.bin"
JAGGED_INPUTS = ("ids", "ratings", "timestamps", "offsets", "num_targets", "query_time", "target_rows", "history_rows")


def device_plan(impl: str | dict | None = None) -> dict:
    """What to compile on this machine. `impl` (default: Triton for every op on CUDA, the reference on a
    CPU) may map op names to implementations, e.g. Triton attention with Inductor-fused projections."""
    if torch.cuda.is_available():
        return {"device": "cuda", "impl": impl or Impl.TRITON.value, "mode": "reduce-overhead",
                "gpu": torch.cuda.get_device_name()}
    return {"device": "cpu", "impl": impl or Impl.REFERENCE.value, "mode": "default", "gpu": None}


def _impl(spec: str | dict) -> Impl | dict:
    return {op: Impl(v) for op, v in spec.items()} if isinstance(spec, dict) else Impl(spec)


def jagged_feed(feed: dict[str, np.ndarray], contextual_len: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Padded engine feed -> jagged rows [contextual][history][candidates] per user (what rank_jagged
    takes) and the [B, Nc] mask of real candidate slots (row-major order = target_rows order)."""
    hist_ids = feed["hist_ids"]
    B, Nh = hist_ids.shape
    Nc = feed["cand_ids"].shape[1]
    C = contextual_len
    hl, nc, qt = feed["hist_lengths"], feed["num_candidates"], feed["query_time"]
    cand_mask = np.arange(Nc)[None] < nc[:, None]
    valid = np.concatenate([np.ones((B, C), bool), np.arange(Nh)[None] < hl[:, None], cand_mask], axis=1)
    ctx = feed["contextual_ids"] if C > 0 else np.zeros((B, 0), np.int64)
    zeros = np.zeros((B, C), np.int64)
    target = np.concatenate([np.zeros((B, C + Nh), bool), np.ones((B, Nc), bool)], axis=1)[valid]
    rows = {
        "ids": np.concatenate([ctx, hist_ids, feed["cand_ids"]], axis=1)[valid],
        "ratings": np.concatenate([zeros, feed["hist_ratings"], np.zeros((B, Nc), np.int64)], axis=1)[valid],
        "timestamps": np.concatenate([np.repeat(qt[:, None], C, 1), feed["hist_timestamps"],
                                      np.repeat(qt[:, None], Nc, 1)], axis=1)[valid],
        "offsets": np.concatenate([[0], np.cumsum(C + hl + nc)]),
        "num_targets": nc,
        "query_time": qt,
        "target_rows": np.flatnonzero(target),
        "history_rows": np.flatnonzero(~target),
    }
    return {k: np.ascontiguousarray(v, dtype=np.int64) for k, v in rows.items()}, cand_mask


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
        model, _ = load_checkpoint(out_dir / "checkpoint")
        model.impl = _impl(meta["impl"])
        self.device = torch.device(meta["device"])
        self.model = model.to(self.device, model.cfg.torch_dtype).eval()
        mode = None if meta["mode"] == "default" else meta["mode"]
        # Automatic dynamic shapes: the first shape compiles static, a second one recompiles once with the
        # changing sizes symbolic. Not dynamic=True: that also makes the config's ints (N, the 1/N scale)
        # symbolic, and the Triton launch then got a float grid size on the H200 (torch 2.11).
        self.fn = torch.compile(self.model.rank_jagged, dynamic=None, mode=mode)
        self._pinned: torch.Tensor | None = None
        if warmup:
            self.warm_up()
        self.load_s = time.perf_counter() - t0

    def warm_up(self) -> tuple[list[float], list[np.ndarray]]:
        """Run a random request of each shipped shape, twice (CUDA graphs record on the second call), in
        the build's order; returns each shape's first-call seconds and first outputs."""
        rng = np.random.default_rng(0)
        times, outs = [], []
        for b, h, c in self.meta["shapes"]:
            feed = example_feed(self.model, "ranking", rng, b, h, c, exact=True)
            t0 = time.perf_counter()
            outs.append(self.run(feed)["probs"])
            times.append(time.perf_counter() - t0)
            self.run(feed)
        return times, outs

    def _to_device(self, rows: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """One host-to-device copy of every input (through a reused pinned buffer on CUDA)."""
        sizes = [rows[k].size for k in JAGGED_INPUTS]
        total = sum(sizes)
        if self.device.type == "cpu":
            flat = torch.from_numpy(np.concatenate([rows[k] for k in JAGGED_INPUTS]))
        else:
            if self._pinned is None or self._pinned.numel() < total:
                self._pinned = torch.empty(max(total, 1 << 16), dtype=torch.int64, pin_memory=True)
            np.concatenate([rows[k] for k in JAGGED_INPUTS], out=self._pinned[:total].numpy())
            flat = self._pinned[:total].to(self.device, non_blocking=True)
        return dict(zip(JAGGED_INPUTS, torch.split(flat, sizes)))

    @torch.no_grad()
    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(feed, self.meta["limits"], self.meta["inputs"])
        rows, cand_mask = jagged_feed(feed, self.meta["limits"]["contextual_len"])
        probs = self.fn(**self._to_device(rows)).float().cpu().numpy()
        out = np.zeros((*cand_mask.shape, probs.shape[-1]), np.float32)
        out[cand_mask] = probs
        return {"probs": out}


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
    write_json_atomic(out_dir / META, meta)
    with tempfile.TemporaryDirectory(prefix="hstu-opt-compiled-") as tmp:
        cold = _fresh_process("compile", out_dir, Path(tmp), timeout_s)
        if cold["nonfinite"]:
            raise StageError(
                f"compiled engine: the compiled model gave {cold['nonfinite']} non-finite probabilities on the warm-up "
                "requests, so it is not shipped: compare it with eager (benchmarks/compile_debug.py shows how; the "
                "last such case was a kernel argument Inductor typed fp64)")
        warm = _fresh_process("warm", out_dir, Path(tmp), timeout_s)
    meta |= {"cold_start": cold, "warm_start": warm}
    write_json_atomic(out_dir / META, meta)
    return {"backend": NAME, "bytes": (out_dir / CACHE).stat().st_size, **meta}


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
              "inductor_cache": _inductor_counters()}
    if step == "compile":
        artifacts = torch.compiler.save_cache_artifacts()
        if artifacts is None:
            raise HstuOptError("torch.compiler.save_cache_artifacts() returned nothing: no compilation was recorded")
        write_bytes_atomic(out_dir / CACHE, artifacts[0])
        np.savez(tmp / "cold_outputs.npz", *outs)
    else:
        cold = np.load(tmp / "cold_outputs.npz")
        result["max_abs_diff_vs_cold"] = max(float(np.abs(o - cold[f"arr_{i}"]).max()) for i, o in enumerate(outs))
    return result


if __name__ == "__main__":
    print(json.dumps(_main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]))))
