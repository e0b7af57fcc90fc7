"""AOTInductor: torch.export of the ranking / retrieval graphs with dynamic batch and lengths, compiled
into a self-contained .pt2 package (C++ on a CPU machine; it would carry Triton kernels on a GPU).

The package runs in any process with a matching torch, without hstu-opt's model code. AOTInductor does
not check input shapes by default (an out-of-range shape runs silently), so the runner checks them
against the limits recorded next to the package and raises a clear error instead.
Known limit (see ENVIRONMENT.md): on the H200 image (torch 2.11) loading any AOTInductor package
segfaults, so this backend is verified on CPU machines only.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from hstu_opt.backends.eager import (ShapeOutOfRange, check_feed, dynamic_shapes, engine_limits, example_feed, graph_module,
                                     input_names, output_names)
from hstu_opt.errors import HstuOptError
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.model.hstu import HstuModel
from hstu_opt.model.scoring import to_tensors

NAME = "aoti"
# Measured on a 2-core CPU: skipping precompiled headers and -O0 for the wrapper saves ~15 s of build
# and does not change run time (the kernels themselves are still optimized).
INDUCTOR_CONFIGS = {"aot_inductor.precompile_headers": False, "aot_inductor.compile_wrapper_opt_level": "O0"}


def build(model: HstuModel, kind: str, out_dir: Path, max_batch: int) -> dict:
    cfg = model.cfg
    example = example_feed(model, kind, np.random.default_rng(0), 2, min(3, cfg.max_history_len), min(2, cfg.max_targets),
                           exact=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(graph_module(model, kind), (), kwargs=to_tensors(example),
                                      dynamic_shapes=dynamic_shapes(kind, model, max_batch))
        out_dir.mkdir(parents=True, exist_ok=True)
        package = out_dir / f"{kind}.pt2"
        torch._inductor.aoti_compile_and_package(program, package_path=str(package), inductor_configs=INDUCTOR_CONFIGS)
    limits = engine_limits(cfg, max_batch)
    meta = {"package": package.name, "inputs": input_names(kind, cfg.contextual_len), "outputs": list(output_names(kind)),
            "limits": limits, "torch": torch.__version__, "device": "cpu"}
    write_json_atomic(out_dir / f"{kind}.aoti.json", meta)
    return {"backend": NAME, "bytes": package.stat().st_size, **meta}


class AotiRunner:
    def __init__(self, out_dir: Path, kind: str):
        self.meta = json.loads((out_dir / f"{kind}.aoti.json").read_text())
        if self.meta["torch"].split("+")[0] != torch.__version__.split("+")[0]:
            raise HstuOptError(f"{out_dir / self.meta['package']}: built with torch {self.meta['torch']}, this process has "
                               f"{torch.__version__}: rebuild the engine (hstu-opt build-engine) with this torch")
        self.package = torch._inductor.aoti_load_package(str(out_dir / self.meta["package"]))

    @torch.no_grad()
    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feed(feed, self.meta["limits"], self.meta["inputs"])
        out = self.package(**to_tensors({k: feed[k] for k in self.meta["inputs"]}))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return {self.meta["outputs"][0]: out.float().numpy()}


def load(out_dir: Path, kind: str) -> AotiRunner:
    return AotiRunner(out_dir, kind)
