"""Where the batch-16 end-to-end time beyond the kernels goes (issue 4: 5.5 ms bar, 6.99 ms wall and
5.98 ms GPU-busy measured in run 12). Two questions, one short GPU run:

1. Does the attention read the fused uvqk's strided q/k/v views (row stride 2048 elements) slower than
   contiguous [L, H, d] tensors? In the engine profile the 4 attention calls take 2.89 ms; the
   stand-alone benchmark on contiguous inputs 4 x 0.656 ms.
2. How long do the runner's host steps (request checks, padded -> jagged rows into the pinned buffer,
   scattering the probabilities back) take on the GPU machine's CPU?

    python benchmarks/batch16_probe.py --out DIR     (writes DIR/batch16_probe.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import dlrm_config, env, graphed  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from hstu_opt.backends import compiled  # noqa: E402
from hstu_opt.backends.eager import check_feed, engine_limits, example_feed, input_names  # noqa: E402
from hstu_opt.model import HstuModel  # noqa: E402
from hstu_opt.ops.hstu_attention.triton import attention_fwd  # noqa: E402


def attention_layouts() -> list[dict]:
    rows = []
    H, d, n = 4, 128, 4352
    for B in (1, 16):
        L = B * n
        offsets = torch.arange(B + 1, device="cuda") * n
        nt = torch.full((B,), 256, device="cuda")
        fused = torch.randn(L, 4 * H * d, device="cuda", dtype=torch.bfloat16)  # [u | v | q | k]
        hv = H * d
        strided = [fused[:, 2 * hv:3 * hv].view(L, H, d), fused[:, 3 * hv:].view(L, H, d), fused[:, hv:2 * hv].view(L, H, d)]
        contiguous = [t.contiguous() for t in strided]
        for name, (q, k, v) in (("strided views of the uvqk output", strided), ("contiguous", contiguous)):
            fn = graphed(lambda: attention_fwd(q, k, v, offsets, nt, n, d ** -0.5, 4, 0))[0]  # noqa: B023
            rows.append({"B": B, "layout": name, "ms": do_bench(fn, warmup=10, rep=100)})
            print(rows[-1], flush=True)
    return rows


def host_steps() -> list[dict]:
    cfg = dlrm_config()
    model = HstuModel(cfg)
    limits, names = engine_limits(cfg, 16), input_names("ranking", cfg.contextual_len)
    pinned = torch.empty(1 << 22, dtype=torch.int64, pin_memory=torch.cuda.is_available()).numpy()
    rows = []
    for B in (1, 16):
        feed = example_feed(model, "ranking", np.random.default_rng(B), B, 4096, 256, exact=True)
        _, mask = compiled.jagged_feed(feed, cfg.contextual_len, pinned)
        probs = np.random.rand(int(mask.sum()), 2).astype(np.float32)

        def scatter():
            out = np.zeros((*mask.shape, 2), np.float32)
            out[mask] = probs

        pinned_t = torch.from_numpy(pinned)
        n = sum(compiled.staged_sizes(B, 4096, 256, cfg.contextual_len))
        flat = [torch.from_numpy(feed[name]).view(-1) for name in compiled.PADDED_INPUTS]
        pool = ThreadPoolExecutor(3)

        def threaded():  # the three [B, Nh] arrays on three threads (numpy copies release the GIL)
            at, jobs = 0, []
            for name, size in zip(compiled.PADDED_INPUTS, compiled.staged_sizes(B, 4096, 256, cfg.contextual_len)):
                dst = pinned[at:at + size]
                if size >= 1 << 15:
                    jobs.append(pool.submit(np.copyto, dst, feed[name].reshape(-1)))
                elif size:
                    dst[:] = feed[name].reshape(-1)
                at += size
            for j in jobs:
                j.result()

        for step, fn in (("check_feed", lambda: check_feed(feed, limits, names)),
                         ("jagged_feed into pinned", lambda: compiled.jagged_feed(feed, cfg.contextual_len, pinned)),
                         ("stage_feed into pinned (the runner)", lambda: compiled.stage_feed(feed, cfg.contextual_len, pinned)),
                         ("staged by torch.cat into pinned", lambda: torch.cat(flat, out=pinned_t[:n])),
                         ("staged on 3 threads into pinned", threaded),
                         ("scatter probs", scatter)):
            fn()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            rows.append({"B": B, "step": step, "ms": (time.perf_counter() - t0) / 50 * 1e3})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--host-only", action="store_true", help="only the host steps (no GPU work)")
    args = ap.parse_args()
    result = {"env": env() if torch.cuda.is_available() else {}, "host_steps": host_steps()}
    if not args.host_only:
        result["attention_layouts"] = attention_layouts()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch16_probe.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
