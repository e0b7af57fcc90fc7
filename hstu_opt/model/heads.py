"""Ranking head (multi-task logits per candidate) and retrieval helpers (query vs. item table)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hstu_opt import ops


class SwishLayerNorm(nn.Module):
    """x * sigmoid(LayerNorm(x))."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(ops.layer_norm(x, self.weight, self.bias, 1e-6))


class RankingHead(nn.Module):
    """logits = MLP(user_state * item_embedding); MLP = Linear(D->h) -> SwishLayerNorm -> Linear(h->T)."""

    def __init__(self, dim: int, hidden: int, num_tasks: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), SwishLayerNorm(hidden), nn.Linear(hidden, num_tasks))

    def forward(self, state: Tensor, item_embedding: Tensor) -> Tensor:
        return self.mlp(state * item_embedding)


def l2_normalize(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1, eps=1e-6).to(x.dtype)
