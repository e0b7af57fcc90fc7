"""A/B of the variants behind issue 4's open bars, in one GPU run (device time is scarce):

1. attention schedule and tiles at the shapes that matter (the issue's N=512 and N=4096 benchmarks,
   N=1024, and the dlrm-v3 serving shapes: 4 contextual rows, 256 targets; batch 1 with its key splits):
   program order (LONGEST_FIRST), one merged key loop vs an unmasked + a masked loop (MERGED), TMA
   descriptors vs pointer loads (TMA), tiles, warps and stages; each kernel's registers, spills and shared memory; outputs against the baseline's;
2. the serving graph (rank_jagged, CUDA-graph replay) at batch 1 and 16, eager ops and compiled as the
   engine compiles it: replay time and GPU-busy time from the profiler.
Every timing is a CUDA-graph replay.

Run 14 (variants_ab_h200_2026-11-29_run14.json) also compared the projections' GEMM with cuBLAS
(torch.addmm after the same Triton norm pass, SiLU in place on u's columns, hstu_output's operands
concatenated by the norm pass): cuBLAS's GEMMs ran at 626-725 TFLOP/s against Triton's 396-424, but the
strided SiLU pass, the concat writes and addmm's residual copy gave it back: dlrm-v3 batch 16 6.64 vs
6.50 ms GPU-busy (eager ops, CUDA graph), batch 1 0.80 vs 0.85. Not kept: the path was reverted before
any commit; the measurements stay in that JSON.

    python benchmarks/variants_ab.py --out DIR     (writes DIR/variants_ab.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import (ceilings, device_rows, dlrm_config, dlrm_feed, dlrm_model, env, gemm_sweep,  # noqa: E402
                      gpu_busy, graphed, jagged, timeline)
from triton.testing import do_bench  # noqa: E402

from hstu_opt.ops import Impl  # noqa: E402
from hstu_opt.ops import _triton as tri  # noqa: E402
from hstu_opt.ops.hstu_attention import triton as attn  # noqa: E402

CASES = [  # name, B, N, C, max targets, fixed length
    ("N=512 B=512", 512, 512, 0, 20, None), ("N=4096 B=128", 128, 4096, 0, 20, None),
    ("N=1024 B=512", 512, 1024, 0, 20, None), ("dlrm-v3 B=16", 16, 4352, 4, 256, 4352),
    ("dlrm-v3 B=1", 1, 4352, 4, 256, 4352),
]
VARIANTS = [  # name, config over _blocks() and FWD_FLAGS. Runs 14-15 (variants_ab_h200_2026-11-29_run14/15.json)
    # also measured, all slower at every case: 64x64 4w 2s/4s, 64x32 4w 3s, 128x64 8w 2s/3s, 64x128 4w 2s/3s,
    # 128x128 8w 2s, with and without TMA (64x32 4w 3s then; with TMA loads, the merged loop and POST_SCALE it
    # measured faster in run 30: triton.TMA_TILES). Runs 20-21: paired query blocks and a skewed key loop, both slower
    # (the kernel's docstring has the numbers; the code is on branch wip/paired-attention)
    # Runs 20-22 also: the same without POST_SCALE (1-3% slower with TMA, neutral with pointers).
    ("base", {}),  # eager launches' (TMA, merged loop, post-scale, TMA_TILES' 64x32, Q in registers, CTX_FIRST)
    # The query blocks that hold contextual rows see the whole history (as long as a sequence's last block);
    # in plain longest-first order they run last, on the launch's tail (run 47: batch 1 0.0734 vs 0.0711 ms)
    ("base (again)", {}),
    # Run 49 (variants_ab_h200_2026-11-30_run49.json): 128-row query blocks in ONE warpgroup (two m64 wgmma
    # per step), which halve the K/V tiles' L2 -> SM traffic per flop (the L2 is 85-87% busy at N=512 and
    # N=4096, run 40) without two warpgroups' 8-warp barriers; 250-255 registers, two programs per SM. Slower
    # at every case, ms against the base's 0.423 / 4.008 / 1.280 / 0.647 / 0.0713 (N=512, N=4096, N=1024,
    # dlrm-v3 batch 16, batch 1): 128x32 0.498 / 4.350 / 1.500 / 0.800 / 0.116 (4-6 spilled registers);
    # 128x16 0.594 / 5.343 / 1.822 / 1.012 / 0.140; 128x32 with 2 stages or with Q in registers slower still.  # the same code timed again: the spread between the two is the run's noise
    # Run 47 (variants_ab_h200_2026-11-30_run47.json) also timed whole query blocks stored through a TMA
    # descriptor: within that run's noise (triton.FWD_FLAGS has the numbers); the code was not kept.
    # Run 40 (variants_ab_h200_2026-11-29_run40.json) also: Q in registers uncapped (202 registers, 2 programs
    # per SM) and 128-row query blocks in two warpgroups capped at 128 registers (with 4 stages, 64-key tiles,
    # Q in registers), each slower at every case (triton.FWD_FLAGS / TMA_TILES have the numbers).
    # Run 32 (variants_ab_h200_2026-11-29_run32.json) also, against 64x32 merged (ms, N=512 / N=4096 / dlrm-v3
    # batch 16): two loops 0.568 / 4.384 / 0.738, 128x32 with 8 warps 0.730 / 5.214 / 0.964, 64x16 0.457 / 5.303
    # / 0.797, natural program order 0.425 / 4.235 / 0.649 (1% faster at N=512, 8% slower at N=1024):
    # 64x32 merged, longest first, stays (0.430 / 4.087 / 0.658).
    # Run 30 (variants_ab_h200_2026-11-29_run30.json) also: 64x32 with 2 stages and 128 registers (4 programs
    # per SM; spills) and 64x64 with 2 stages, slower at every case (triton.TMA_TILES has the numbers).
    # Run 28 (variants_ab_h200_2026-11-29_run28.json) also timed persistent programs (2 per SM, or one,
    # walking the work items round-robin, longest query blocks first) with host-made, kernel-made and no
    # descriptors: far slower at every case (N=4096 0.45 vs 0.71 of matmul, N=512 0.25 vs 0.38, dlrm-v3
    # batch 16 0.79 vs 0.68 ms); the code is on branch wip/persistent-attention.
]


class Recorder:
    """A launcher that keeps the compiled kernel (registers, spills, shared memory)."""

    def __init__(self):
        self.kernel = None

    def __call__(self, fn):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.kernel = fn[grid](*args, **kwargs)
                    return rec.kernel
                return launch
        return _Grid()


def attention_ab(matmul: float) -> list[dict]:
    gen = torch.Generator().manual_seed(5)
    rows = []
    for name, B, N, C, T, fixed in CASES:
        (q, k, v, offsets, nt), lengths = jagged(B, N, 4, 128, 128, torch.bfloat16, gen, max_targets=T, C=C,
                                                 lengths=None if fixed is None else [fixed] * B)
        if fixed is not None:
            nt.fill_(T)
        base = attn._blocks(128, 128, q.dtype)
        splits = attn.fwd_splits(B * 4, N, base["BLOCK_M"], base["BLOCK_N"])
        flops = 2 * 4 * 256 * float((lengths.double() ** 2).sum()) / 2
        ref = None
        for vname, cfg in VARIANTS:
            out = (torch.full((splits, q.shape[0], 4, 128), float("nan"), device=q.device) if splits > 1
                   else torch.full_like(v, float("nan")))
            rec = Recorder()
            try:
                attn.launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, 0, launcher=rec, config=cfg)
                torch.cuda.synchronize()
                got = (out.sum(0) if splits > 1 else out).float()
                fn = graphed(lambda: attn.launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, 0,  # noqa: B023
                                                     config=cfg))[0]  # noqa: B023
                ms = do_bench(fn, warmup=10, rep=100)
            except Exception as exc:  # a config that does not fit (shared memory, registers)
                rows.append({"case": name, "variant": vname, "error": str(exc)[:200] + " | " + repr(exc.__cause__)[:300]})
                print(rows[-1], flush=True)
                continue
            if ref is None:
                ref = got
            kern = rec.kernel
            rows.append({"case": name, "variant": vname, "config": cfg, "splits": splits, "ms": ms,
                         "tflops": flops / ms / 1e9, "ratio_to_matmul": flops / ms / 1e9 / matmul,
                         "max_abs_diff_vs_baseline": float((got - ref).abs().max()),
                         "rel_diff_vs_baseline": float((got - ref).abs().max() / ref.abs().max()),
                         "nonfinite": int((~torch.isfinite(got)).sum()),
                         "n_regs": getattr(kern, "n_regs", None), "n_spills": getattr(kern, "n_spills", None),
                         "shared_bytes": getattr(getattr(kern, "metadata", None), "shared", None)})
            print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in rows[-1].items() if k != "config"},
                  flush=True)
    return rows


MODEL_VARIANTS = [  # name, attention flags, torch.compile (as the engine) or eager ops, eager layers (every
    # layer but the last outside the compiled graph: HstuModel.use_eager_layers; the attention then reads through
    # TMA descriptors), GEMM flags
    # (run 16 also measured: compiled with the pointer kernel's merged loop, and compiled with only the
    # attention out of the graph (a graph break per layer); both slower than the engine's two loops.
    # Run 28: eager ops 6.24 / 5.97 ms GPU-busy at batch 16 with the pointer / TMA GEMM)
    # (runs 16-40 also measured compiled variants: with the pointer kernel, with eager layers and pointer
    # attention; the engine's choice, compiled with eager layers and TMA attention, was the fastest)
    # (run 47: eager ops, the serving graph's kernels launched one by one into a CUDA graph, against the
    # same with contextual blocks last; timed one after the other these drift with the card's temperature:
    # benchmarks/sustained_ab.py times variants in alternating rounds instead)
    ("eager ops", {}, False, False, {}),
    ("eager ops, contextual blocks last", {"CTX_FIRST": False}, False, False, {}),
    ("eager ops (again)", {}, False, False, {}),
]


@torch.no_grad()
def model_ab() -> list[dict]:
    """The serving graph at batch 1 and 16 per variant, as a CUDA-graph replay; compiled variants as the
    engine runs it (torch.compile, default mode, then a CUDA graph of the compiled call)."""
    cfg = dlrm_config()
    model = dlrm_model(cfg, Impl.TRITON)
    feeds = {B: device_rows(cfg, dlrm_feed(model, B)) for B in (1, 16)}
    rows, first = [], {}
    flags0, gemm0 = dict(attn.FWD_FLAGS), dict(tri.GEMM_FLAGS)
    for name, flags, compiled, outside, gemm in MODEL_VARIANTS:
        attn.FWD_FLAGS.update(flags0 | flags)
        tri.GEMM_FLAGS.update(gemm0 | gemm)
        model.use_eager_layers(outside)
        torch._dynamo.reset()  # (the FX graph cache is off: its key does not see these module switches)
        fn = torch.compile(model.rank_jagged, dynamic=None) if compiled else model.rank_jagged
        for B, t in feeds.items():
            t0 = time.time()
            try:
                replay, out = graphed(lambda: fn(**t))  # noqa: B023
                replay()
                torch.cuda.synchronize()
            except Exception as exc:
                rows.append({"B": B, "variant": name, "error": repr(exc)[:1500]})
                print(rows[-1], flush=True)
                continue
            got = out.float().clone()
            first.setdefault(B, got)
            busy, top = gpu_busy(replay)
            rows.append({"B": B, "variant": name, "setup_s": time.time() - t0,
                         "replay_ms": do_bench(replay, warmup=5, rep=50), "gpu_busy_ms": busy, "top": top,
                         "timeline": timeline(replay),
                         "nonfinite": int((~torch.isfinite(got)).sum()),
                         "max_abs_diff_vs_first": float((got - first[B]).abs().max())})
            print({k: x for k, x in rows[-1].items() if k != "top"}, flush=True)
            del replay, out
    attn.FWD_FLAGS.update(flags0)
    tri.GEMM_FLAGS.update(gemm0)
    model.use_eager_layers(False)
    return rows


def gemm_rows() -> list[dict]:
    """The projections' GEMM tiles (gpu_hstu.gemm_sweep). Run 22 (variants_ab_h200_2026-11-29_run22.json)
    also timed hstu_output's three operands in one K loop against one loop each: slower (batch 16 0.285
    vs 0.278 ms, batch 1 0.061 vs 0.053 ms), not kept."""
    rows = gemm_sweep()
    for r in rows:
        print({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}, flush=True)
    return rows


def main() -> None:
    inductor_config.fx_graph_cache = False
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--skip", nargs="*", default=[], choices=["attention", "gemm", "model"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"env": env()}
    t0 = time.time()
    result["ceilings"] = ceilings()
    print(result["env"], result["ceilings"], flush=True)
    for part, fn in (("attention", lambda: attention_ab(result["ceilings"]["matmul_bf16_tflops"])),
                     ("gemm", gemm_rows), ("model", model_ab)):
        if part in args.skip:
            continue
        try:
            result[part] = fn()
        except Exception as exc:  # keep what the other parts measured
            result[f"{part}_error"] = repr(exc)[:2000]
            print(part, "failed:", repr(exc)[:2000], flush=True)
        result["seconds"] = time.time() - t0
        (args.out / "variants_ab.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
