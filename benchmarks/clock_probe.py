"""Why a batch-16 request waits longer than its kernels run (issue 4's 5.5 ms bar). In run 45 the engine's
wait for a batch-16 request was 5.45 ms against 5.14 ms of GPU-busy time from the profiler (0.31 ms
more), while at batch 1 the two differed by 0.02 ms. The profiler's pass runs a few calls with host
gaps between them; the timed loop runs requests back to back. If the GPU lowers its SM clock under
sustained load (power or temperature), kernels run longer in the loop than in the profile.

This script serves the dlrm-v3 ranking graph (eager Triton ops, one CUDA graph, as the engine replays
it) and times each call with CUDA events in phases: calls spaced by idle time, calls back to back (the
benchmark's closed loop), then spaced again; meanwhile `nvidia-smi` samples the SM clock, power draw,
temperature and the active clock-event reasons (read only: the card's settings are left alone).

    python benchmarks/clock_probe.py --out DIR     (writes DIR/clock_probe.json)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import device_rows, dlrm_config, dlrm_feed, dlrm_model, env, gpu_busy, graphed  # noqa: E402

from hstu_opt.ops import Impl  # noqa: E402

FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active")


class Sampler:
    """nvidia-smi in loop mode (every `ms`), each line stamped with the host clock when read."""

    def __init__(self, ms: int = 25):
        self.samples: list[tuple[float, list[str]]] = []
        fields = list(FIELDS)
        probe = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                               capture_output=True, text=True)
        if probe.returncode:  # drivers before 535 name the reasons field the old way
            fields[-1] = "clocks_throttle_reasons.active"
        self.proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                                      f"-lms={ms}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.samples.append((time.perf_counter(), [x.strip() for x in line.split(",")]))

    def window(self, t0: float, t1: float) -> dict:
        rows = [s for t, s in self.samples if t0 <= t <= t1 and len(s) == len(FIELDS)]
        if not rows:
            return {"samples": 0, "raw": [s for _, s in self.samples[-3:]]}

        def num(i):
            vals = []
            for r in rows:
                try:
                    vals.append(float(r[i]))
                except ValueError:
                    pass
            return {"p10": float(np.percentile(vals, 10)), "p50": float(np.median(vals)),
                    "p90": float(np.percentile(vals, 90))} if vals else None

        return {"samples": len(rows), "sm_mhz": num(0), "mem_mhz": num(1), "power_w": num(2), "temp_c": num(3),
                "reasons": sorted({r[4] for r in rows})}

    def stop(self) -> None:
        self.proc.terminate()


def phase(replay, calls: int, idle_s: float, sampler: Sampler) -> dict:
    """Each call timed with CUDA events around the replay, then a synchronize, then idle_s of sleep."""
    ms = []
    t0 = time.perf_counter()
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
        if idle_s:
            time.sleep(idle_s)
    t1 = time.perf_counter()
    n = len(ms)
    return {"calls": n, "idle_s": idle_s, "seconds": t1 - t0, "event_ms_p50": float(np.median(ms)),
            "event_ms_p10": float(np.percentile(ms, 10)), "event_ms_p90": float(np.percentile(ms, 90)),
            "event_ms_first10": float(np.median(ms[:10])), "event_ms_last10": float(np.median(ms[-10:])),
            "gpu": sampler.window(t0, t1)}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"env": env(), "phases": []}
    cfg = dlrm_config()
    model = dlrm_model(cfg, Impl.TRITON)
    sampler = Sampler()
    time.sleep(1.0)
    t = time.perf_counter()
    result["idle_before"] = sampler.window(t - 0.9, t)
    for B, long_calls in ((16, 400), (1, 1500)):
        rows = device_rows(cfg, dlrm_feed(model, B))
        replay, _ = graphed(lambda: model.rank_jagged(**rows))  # noqa: B023
        busy, top = gpu_busy(replay)
        plan = [("spaced 50 ms", 30, 0.05), ("back to back", long_calls, 0.0), ("spaced 50 ms", 30, 0.05),
                ("back to back", long_calls, 0.0)]
        for name, calls, idle in plan:
            row = {"B": B, "phase": name, "gpu_busy_ms_profiler": busy, **phase(replay, calls, idle, sampler)}
            result["phases"].append(row)
            g = row["gpu"]
            print(B, name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()
                            if k.startswith("event") or k == "gpu_busy_ms_profiler"},
                  {k: g.get(k) for k in ("samples", "sm_mhz", "power_w", "temp_c", "reasons")}, flush=True)
        result.setdefault("top_kernels", {})[B] = top
        del replay
    sampler.stop()
    (args.out / "clock_probe.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
