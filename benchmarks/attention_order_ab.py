"""A/B of the attention's program order (longest query blocks first vs natural order) at the shapes
that matter: the issue's N=4096 and N=512 benchmarks and the dlrm-v3 serving shapes (4 contextual
rows, 256 targets; batch 1 with its key splits). Each timing is a CUDA-graph replay.

    python benchmarks/attention_order_ab.py --out DIR     (writes DIR/attention_order_ab.json)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_hstu import env, graphed, jagged  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from hstu_opt.ops.hstu_attention.triton import _blocks, fwd_splits, launch_fwd  # noqa: E402

CASES = [  # name, B, N, C, targets, fixed length
    ("N=4096 B=128", 128, 4096, 0, 20, None), ("N=512 B=512", 512, 512, 0, 20, None),
    ("dlrm-v3 B=16", 16, 4352, 4, 256, 4352), ("dlrm-v3 B=1", 1, 4352, 4, 256, 4352),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(5)
    rows = []
    for name, B, N, C, T, fixed in CASES:
        (q, k, v, offsets, nt), lengths = jagged(B, N, 4, 128, 128, torch.bfloat16, gen, max_targets=T, C=C,
                                                 lengths=None if fixed is None else [fixed] * B)
        if fixed is not None:
            nt.fill_(T)
        cfg = _blocks(128, 128, q.dtype)
        splits = fwd_splits(B * 4, N, cfg["BLOCK_M"], cfg["BLOCK_N"])
        out = q.new_empty(splits, q.shape[0], 4, 128, dtype=torch.float32) if splits > 1 else torch.empty_like(v)
        flops = 2 * 4 * 256 * float((lengths.double() ** 2).sum()) / 2
        for first in (True, False):
            fn = graphed(lambda: launch_fwd(q, k, v, offsets, nt, out, N, 128 ** -0.5, C, 0,  # noqa: B023
                                            config={"LONGEST_FIRST": first}))[0]
            ms = do_bench(fn, warmup=10, rep=100)
            rows.append({"case": name, "splits": splits, "longest_first": first, "ms": ms, "tflops": flops / ms / 1e9})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attention_order_ab.json").write_text(json.dumps({"env": env(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
