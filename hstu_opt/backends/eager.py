"""PyTorch eager: the reference every engine is compared and benchmarked against."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from hstu_opt.data.batching import RANKING_INPUTS, RETRIEVAL_INPUTS
from hstu_opt.data.requests import random_requests
from hstu_opt.errors import HstuOptError
from hstu_opt.model.hstu import HstuModel
from hstu_opt.model.scoring import to_tensors

RANKING_OUTPUTS = ("probs",)
RETRIEVAL_OUTPUTS = ("query_embedding",)


class RankingGraph(nn.Module):
    """model.rank with the engine contract as positional inputs (what export traces)."""

    def __init__(self, model: HstuModel):
        super().__init__()
        self.model = model

    def forward(self, hist_ids, hist_ratings, hist_timestamps, hist_lengths, cand_ids, num_candidates, query_time,
                contextual_ids=None):
        return self.model.rank(hist_ids, hist_ratings, hist_timestamps, hist_lengths, cand_ids, num_candidates,
                               query_time, contextual_ids)


class RetrievalGraph(nn.Module):
    def __init__(self, model: HstuModel):
        super().__init__()
        self.model = model

    def forward(self, hist_ids, hist_ratings, hist_timestamps, hist_lengths, query_time, contextual_ids=None):
        return self.model.retrieve(hist_ids, hist_ratings, hist_timestamps, hist_lengths, query_time, contextual_ids)


def graph_module(model: HstuModel, kind: str) -> nn.Module:
    return (RankingGraph if kind == "ranking" else RetrievalGraph)(model).eval()


def output_names(kind: str) -> tuple[str, ...]:
    return RANKING_OUTPUTS if kind == "ranking" else RETRIEVAL_OUTPUTS


class EagerRunner:
    """Runs a graph module on a feed dict; also a polygraphy runner (see as_polygraphy)."""

    def __init__(self, module: nn.Module, kind: str):
        self.module, self.kind = module, kind

    @torch.no_grad()
    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.module(**to_tensors(feed))
        return {output_names(self.kind)[0]: out.float().numpy()}

    def as_polygraphy(self, onnx_path, name: str = "pytorch-eager"):
        """A polygraphy runner; input metadata (names, dtypes, dynamic shapes) come from the exported graph."""
        import onnx
        from polygraphy.backend.base import BaseRunner
        from polygraphy.backend.onnx import util as onnx_util

        metadata = onnx_util.get_input_metadata(onnx.load(str(onnx_path), load_external_data=False).graph)

        outer = self

        class _Runner(BaseRunner):
            def __init__(self):
                super().__init__(name=name, prefix="pytorch-eager")

            def activate_impl(self):
                pass

            def deactivate_impl(self):
                pass

            def get_input_metadata_impl(self):
                return metadata

            def infer_impl(self, feed_dict):
                t0 = time.perf_counter()
                out = outer.run(dict(feed_dict))
                self.inference_time = time.perf_counter() - t0
                return OrderedDict(out)

        return _Runner()


# ---- the graph contract: input names, dynamic dims, example feeds (shared by every exporter) ----
def input_names(kind: str, contextual_len: int) -> list[str]:
    names = list(RANKING_INPUTS if kind == "ranking" else RETRIEVAL_INPUTS)
    return names + (["contextual_ids"] if contextual_len > 0 else [])


def example_feed(model: HstuModel, kind: str, rng: np.random.Generator, batch: int, hist: int, cand: int,
          exact: bool = False) -> dict[str, np.ndarray]:
    cfg = model.cfg
    req = random_requests(rng, batch, hist, cand, num_items=cfg.num_items, contextual_len=cfg.contextual_len,
                          contextual_cardinality=cfg.contextual_cardinality, exact=exact)
    return req.ranking_feed() if kind == "ranking" else req.retrieval_feed()


def dynamic_shapes(kind: str, model: HstuModel, max_batch: int) -> dict:
    cfg = model.cfg
    Dim = torch.export.Dim
    b = Dim("batch", min=1, max=max_batch)
    h = Dim("hist", min=1, max=cfg.max_history_len)
    c = Dim("cand", min=1, max=cfg.max_targets)
    shapes = {"hist_ids": {0: b, 1: h}, "hist_ratings": {0: b, 1: h}, "hist_timestamps": {0: b, 1: h},
              "hist_lengths": {0: b}, "cand_ids": {0: b, 1: c}, "num_candidates": {0: b}, "query_time": {0: b},
              "contextual_ids": {0: b}}
    return {n: shapes[n] for n in input_names(kind, cfg.contextual_len)}


class ShapeOutOfRange(HstuOptError):
    """A request is outside the shapes the engine was built for."""


def engine_limits(cfg, max_batch: int) -> dict:
    return {"batch": [1, max_batch], "history": [1, cfg.max_history_len], "candidates": [1, cfg.max_targets],
            "contextual_len": cfg.contextual_len}


def check_dims(dims: dict[str, int], limits: dict) -> None:
    """Each padded size (batch, history, candidates) within the engine's limits."""
    for axis, size in dims.items():
        lo, hi = limits[axis]
        if not lo <= size <= hi:
            raise ShapeOutOfRange(f"{axis} = {size} is outside this engine's range [{lo}, {hi}]: split or truncate "
                                  "the request, or rebuild with larger limits in the recipe")


def check_feed(feed: dict[str, np.ndarray], limits: dict, inputs: list[str]) -> None:
    """Engines without their own shape checks (AOTInductor, torch.compile) call this before running: an
    out-of-range request would otherwise run silently (and read past the model's tables)."""
    dims = {"batch": feed["hist_ids"].shape[0], "history": feed["hist_ids"].shape[1]}
    if "cand_ids" in feed:
        dims["candidates"] = feed["cand_ids"].shape[1]
    check_dims(dims, limits)
    missing = set(inputs) - set(feed)
    if missing:
        raise ShapeOutOfRange(f"request lacks inputs {sorted(missing)}: this engine takes {inputs}")
