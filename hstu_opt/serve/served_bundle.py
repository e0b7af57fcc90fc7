"""What the server reads from a bundle: the manifest, the model's config, the serving section, the
engines present, the INT8 accuracy gate's verdict and the retrieval item table."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from hstu_opt.bundle import load_manifest
from hstu_opt.errors import BundleError
from hstu_opt.model.checkpoint import read_meta
from hstu_opt.model.config import HstuConfig
from hstu_opt.recipe import ServingSection
from hstu_opt.serve.requests import RequestLimits

CHECKPOINT = Path("train-stub/checkpoint")
ORT_DIR = Path("build-engine/onnxruntime")
COMPILED_DIR = Path("build-engine/compiled")
INT8_ACCURACY = Path("calibrate-int8/accuracy.json")
ITEM_TABLE = Path("export-onnx/item_embeddings.npy")


@dataclass(frozen=True)
class ServedBundle:
    path: Path
    manifest: dict
    cfg: HstuConfig

    @classmethod
    def open(cls, path: Path) -> "ServedBundle":
        manifest = load_manifest(path)  # BundleError: not a bundle
        if not (path / CHECKPOINT).is_dir():
            raise BundleError(f"{path}: no {CHECKPOINT}: the server needs the checkpoint; rebuild the bundle")
        return cls(path, manifest, HstuConfig.from_dict(read_meta(path / CHECKPOINT)["config"]))

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @cached_property
    def serving(self) -> ServingSection:
        """The recipe's serving section (defaults for bundles built before it existed)."""
        return ServingSection.model_validate(self.manifest["recipe"].get("serving", {}))

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits.from_config(self.cfg, self.serving.time_granularity_s)

    @property
    def engine_max_batch(self) -> int:
        """Most padded rows one engine call takes (the exported graphs' batch limit)."""
        return int(self.manifest["recipe"]["export"]["max_batch"])

    def ort_session_dir(self, kind: str, precision: str) -> Path | None:
        d = self.path / ORT_DIR
        return d if (d / f"{kind}.{precision}.session.json").is_file() else None

    def compiled_dir(self) -> Path | None:
        d = self.path / COMPILED_DIR
        return d if (d / "ranking.compiled.json").is_file() else None

    def compiled_meta(self) -> dict | None:
        d = self.compiled_dir()
        return json.loads((d / "ranking.compiled.json").read_text()) if d else None

    def int8_passed(self) -> bool:
        """Whether calibrate-int8's accuracy report says the INT8 graphs are within the recipe's bar."""
        f = self.path / INT8_ACCURACY
        return f.is_file() and bool(json.loads(f.read_text()).get("within_bar"))

    def item_table(self) -> np.ndarray:
        """[num_items, D] float32, row i = item i+1, L2-normalized (as export-onnx wrote it)."""
        f = self.path / ITEM_TABLE
        if not f.is_file():
            raise BundleError(f"{self.path}: no {ITEM_TABLE}: /v1/retrieve needs it; rebuild through export-onnx")
        return np.load(f).astype(np.float32, copy=False)

    def engines(self) -> list[str]:
        """The engines this bundle can serve, for messages."""
        have = ["eager"]
        have += [f"onnxruntime.{p}" for p in ("fp32", "int8") if self.ort_session_dir("ranking", p)]
        return have + (["compiled"] if self.compiled_dir() else [])
