"""Scorers over the padded engine contract, for evaluation (see data.metrics.evaluate)."""

from __future__ import annotations

import numpy as np
import torch

from hstu_opt.data.batching import PaddedBatch
from hstu_opt.model.hstu import HstuModel


def to_tensors(feed: dict[str, np.ndarray], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in feed.items()}


class TorchScorer:
    """The eager PyTorch model (the reference) behind the Scorer protocol."""

    def __init__(self, model: HstuModel):
        self.model = model.eval()
        with torch.no_grad():
            self.table = model.item_table().float()

    @torch.no_grad()
    def rank(self, batch: PaddedBatch) -> np.ndarray:
        return self.model.rank(**to_tensors(batch.ranking_feed())).numpy()

    @torch.no_grad()
    def retrieve(self, batch: PaddedBatch) -> np.ndarray:
        return self.model.retrieve(**to_tensors(batch.retrieval_feed())).float().numpy()

    def score_items(self, batch: PaddedBatch) -> np.ndarray:
        return self.retrieve(batch) @ self.table.numpy().T
