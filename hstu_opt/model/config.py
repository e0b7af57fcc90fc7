"""The model's configuration: the recipe's architecture plus the vocab sizes found in the data."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the model itself needs no recipe (or pydantic): it also runs where only torch is
    from hstu_opt.recipe import ModelSection

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}  # (float64: checks only; recipes offer the first three)


@dataclass(frozen=True)
class HstuConfig:
    embedding_dim: int
    num_layers: int
    num_heads: int
    attention_dim: int
    linear_dim: int
    max_history_len: int
    max_targets: int
    num_items: int  # item ids are 1..num_items; 0 is padding
    num_ratings: int = 5  # rating ids 1..num_ratings; 0 = unknown (candidate rows)
    contextual_len: int = 0
    contextual_cardinality: int = 1
    max_attn_len: int = 0
    min_full_attn_seq_len: int = 0
    attn_alpha: float | None = None
    num_time_buckets: int = 2048
    time_bucket_fn: str = "sqrt"
    ranking_tasks: tuple[str, ...] = ("watched", "liked")
    ranking_hidden_dim: int = 64
    dtype: str = "float32"

    @property
    def max_seq_len(self) -> int:
        """N: the fixed 1/N attention scale, so a user's score never depends on its batch."""
        return self.contextual_len + self.max_history_len + self.max_targets

    @property
    def alpha(self) -> float:
        return self.attn_alpha if self.attn_alpha is not None else 1.0 / math.sqrt(self.attention_dim)

    @property
    def num_position_buckets(self) -> int:
        return self.max_seq_len + 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def from_recipe(cls, model: "ModelSection", *, num_items: int, num_ratings: int, contextual_cardinality: int) -> "HstuConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        arch = {k: v for k, v in model.model_dump().items() if k in fields}
        return cls(**arch, num_items=num_items, num_ratings=num_ratings, contextual_cardinality=contextual_cardinality)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HstuConfig":
        d = dict(d)
        d["ranking_tasks"] = tuple(d["ranking_tasks"])
        return cls(**d)
