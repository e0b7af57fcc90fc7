"""Assemble a bundle `hstu-opt serve` can load, for serving benchmarks at production sizes, without training.

    python benchmarks/serve_gpu_bundle.py --out /tmp/b [--recipe recipes/dlrm-v3-ranking.yaml] \
        [--shapes 1,4096,256;16,4096,256] [--max-batch 16] [--no-engine]

Training dlrm-v3-ranking (5 layers, D=512, 4096-row histories) is not what a serving benchmark measures, so
this writes only the parts the server reads, with the recipe's architecture and seeded random weights:
train-stub/checkpoint (the model), export-onnx/item_embeddings.npy (for /v1/retrieve), build-engine/compiled (the `compiled` GPU engine, built by
hstu_opt.backends.compiled.build exactly as the build-engine stage does: cold compile and warm start in
fresh processes) and a manifest whose `note` says the weights are random. Latency does not depend on the
weights' values; scores from such a bundle mean nothing. Prints the bundle path last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hstu_opt import toolchain  # noqa: E402
from hstu_opt.bundle import MANIFEST, SCHEMA_VERSION  # noqa: E402
from hstu_opt.fsutil import write_json_atomic  # noqa: E402
from hstu_opt.model import HstuConfig, HstuModel  # noqa: E402
from hstu_opt.model.checkpoint import save_checkpoint  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from hstu_opt.recipe import load_recipe  # noqa: E402

NOTE = "random weights: assembled by benchmarks/serve_gpu_bundle.py for serving benchmarks; scores mean nothing"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "dlrm-v3-ranking.yaml")
    ap.add_argument("--shapes", default="1,4096,256;16,4096,256", help="engine shapes compiled ahead: B,history,cands;...")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--no-engine", action="store_true", help="checkpoint and manifest only (eager serving)")
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    syn = recipe.data.synthetic
    cfg = HstuConfig.from_recipe(recipe.model, num_items=syn.num_items, num_ratings=5,
                                 contextual_cardinality=syn.contextual_cardinality)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = HstuModel(cfg, impl=Impl.TRITON if device == "cuda" else Impl.REFERENCE).eval().to(device, cfg.torch_dtype)
    bundle = args.out / recipe.name / recipe.version
    save_checkpoint(bundle / "train-stub" / "checkpoint", model, {"note": NOTE})
    (bundle / "export-onnx").mkdir(parents=True, exist_ok=True)  # the item table /v1/retrieve scores against
    with torch.no_grad():
        np.save(bundle / "export-onnx" / "item_embeddings.npy", model.item_table().float().cpu().numpy())
    engine = {}
    if not args.no_engine:
        from hstu_opt.backends import compiled

        t0 = time.time()
        shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
        engine = compiled.build(model, bundle / "build-engine" / "compiled", max_batch=args.max_batch, shapes=shapes)
        engine["build_s"] = time.time() - t0
    write_json_atomic(bundle / MANIFEST, {
        "schema_version": SCHEMA_VERSION, "name": recipe.name, "version": recipe.version, "note": NOTE,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.model_dump(mode="json"), "recipe_sha256": recipe.digest(), "toolchain": toolchain.toolchain(),
        "stages": {}, "files": {}})
    print(json.dumps({k: engine.get(k) for k in ("build_s", "cold_start", "warm_start")}, default=str)[:2000])
    print(bundle)


if __name__ == "__main__":
    main()
