"""Why the engine's CUDA graph idles after its copy-in (issue 4, end to end at batch 1 and 16).

The profiled engine graph (runs 36-39) shows 170-220 us between the graph's first node, the copy of the
staged request from page-locked host memory, and its first kernel. Question: is it the host-memory
copy *node* (a copy-engine node in a graph of kernels), and does a kernel that reads (and one that
writes) the page-locked buffer through its device address avoid it?

A stand-in graph: K small kernels between the copy in and the copy out, per variant:
- memcpy nodes: the runner's graph today (copy in and copy out captured as graph memcpy nodes);
- copies outside: kernels only in the graph, the copies issued on the stream before and after replay;
- mapped kernels: the copies done by Triton kernels that read / write the page-locked host buffer;
- kernels only: no copies (the floor).
Per variant: replay() host time, wall time of replay + synchronize (p50 of 300), and from the profiler
the gap between the graph's first and second GPU activity.

Answer (run 41, benchmarks/results/graph_copy_probe_h200_2026-11-29_run41.json): not the copy. The gap
grows with the number of kernels (74-85 us with 60, 261-350 us with 200) while wall time does not
differ between the variants (60 kernels: 89-142 us, 200: 345-376 us): the copy node starts at once and
the kernels start when the graph's launch has gone through, as they do in a graph of kernels only. The
runner's graphs keep their copy nodes.

    python benchmarks/graph_copy_probe.py --out DIR     (writes DIR/graph_copy_probe.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import env  # noqa: E402

from hstu_opt.backends.compiled import host_buffer  # noqa: E402


class HostPtr:
    """A page-locked host array as a Triton pointer argument: Triton's launcher turns its address into the
    device address (cuPointerGetAttribute), so a kernel reads or writes host memory directly."""

    def __init__(self, a: np.ndarray, dtype: torch.dtype):
        self.a, self.dtype = a, dtype

    def data_ptr(self) -> int:
        return self.a.ctypes.data


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


def copy(src, dst, n: int) -> None:
    _copy[(triton.cdiv(n, 1024),)](src, dst, n, BLOCK=1024)


def probe(n_in: int, n_out: int, kernels: int, variant: str) -> dict:
    host_in = host_buffer(n_in, True)
    host_in[:] = np.arange(n_in)
    host_out = host_buffer(n_out, True, np.float32)
    flat = torch.zeros(n_in, dtype=torch.int64, device="cuda")
    work = torch.zeros(1 << 16, device="cuda")
    out = torch.zeros(n_out, device="cuda")
    src, dst = torch.from_numpy(host_in), torch.from_numpy(host_out)

    def body():
        if variant == "memcpy nodes":
            flat.copy_(src, non_blocking=True)
        elif variant == "mapped kernels":
            copy(HostPtr(host_in, torch.int64), flat, n_in)
        for _ in range(kernels):
            work.add_(1.0)
        out.copy_(flat[:n_out].float() + work[0])
        if variant == "memcpy nodes":
            dst.copy_(out, non_blocking=True)
        elif variant == "mapped kernels":
            copy(out, HostPtr(host_out, torch.float32), n_out)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        body()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()

    def request():
        if variant == "copies outside":
            flat.copy_(src, non_blocking=True)
        t0 = time.perf_counter()
        g.replay()
        t1 = time.perf_counter()
        if variant == "copies outside":
            dst.copy_(out, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return t1 - t0

    for _ in range(20):
        request()
    host_in[:] = np.arange(n_in)[::-1]  # the request changes: the copy in must see it
    request()
    correct = variant == "kernels only" or bool(np.allclose(host_out, np.arange(n_in)[::-1][:n_out] + work[0].item()))
    launch, wall = [], []
    for _ in range(300):
        t0 = time.perf_counter()
        launch.append(request())
        wall.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            request()
    ev = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                key=lambda e: e.time_range.start)
    per = len(ev) // 3
    first = ev[-per:]  # the last request's GPU activities, in order
    gaps = [(b.time_range.start - a.time_range.end, a.name[:40], b.name[:40]) for a, b in zip(first, first[1:])]
    top = sorted(gaps, reverse=True)[:3]
    return {"variant": variant, "kernels": kernels, "in_bytes": n_in * 8, "out_bytes": n_out * 4,
            "launch_us_p50": 1e6 * statistics.median(launch), "wall_us_p50": 1e6 * statistics.median(wall),
            "wall_us_p90": 1e6 * sorted(wall)[int(0.9 * len(wall))], "gpu_span_us": first[-1].time_range.end - first[0].time_range.start,
            "top_gaps_us": [{"us": g, "after": a, "before": b} for g, a, b in top], "correct": correct}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"env": env(), "rows": []}
    # batch 16's staged request is ~0.56 MB of int64 (the engine's flat feed), its output 16 x 256 x 2 floats
    for n_in, n_out in ((4_500, 512), (70_000, 8192)):
        for kernels in (60, 200):
            for variant in ("memcpy nodes", "copies outside", "mapped kernels", "kernels only"):
                try:
                    row = probe(n_in, n_out, kernels, variant)
                except Exception as exc:
                    row = {"variant": variant, "kernels": kernels, "in_bytes": n_in * 8, "error": repr(exc)[:500]}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
                (args.out / "graph_copy_probe.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
