"""Hardware counters for the attention kernel (run under Nsight Compute on the H200): one launch per
(case, variant), so `ncu --kernel-name regex:_hstu_fwd` profiles each once. The variants are
benchmarks/variants_ab.py's; the question is what bounds the kernel (tensor pipe, L2 -> shared memory
traffic of the K/V tiles, issue, or latency), and what holding Q in registers changes.

    ncu --clock-control none --kernel-name regex:_hstu_fwd --section SpeedOfLight ... \\
        python benchmarks/attn_ncu.py --variants base qreg
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import jagged  # noqa: E402
from variants_ab import CASES, VARIANTS  # noqa: E402

from hstu_opt.ops.hstu_attention import triton as attn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="*", default=["N=512 B=512", "N=4096 B=128"])
    ap.add_argument("--variants", nargs="*", default=[name for name, _ in VARIANTS])
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(5)
    for name, B, N, C, T, fixed in CASES:
        if name not in args.cases:
            continue
        (q, k, v, offsets, nt), _ = jagged(B, N, 4, 128, 128, torch.bfloat16, gen, max_targets=T, C=C,
                                           lengths=None if fixed is None else [fixed] * B)
        out = torch.empty_like(v)
        for vname, cfg in VARIANTS:
            if vname in args.variants:
                print(f"launch: {name} / {vname}", flush=True)
                attn.launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, 0, config=cfg)
                torch.cuda.synchronize()


if __name__ == "__main__":
    main()
