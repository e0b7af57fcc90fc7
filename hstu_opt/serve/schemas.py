"""The HTTP API contract: pydantic request and response models (what /openapi.json publishes).

Types and static bounds live here; checks that depend on the bundle (item ids in 1..num_items, the
contextual row count) and between fields (list lengths) live in hstu_opt.serve.requests, shared by
every runner. Imports pydantic only (no fastapi), so runners and tests can use it alone.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_K = 1000  # most items one /v1/retrieve returns


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class History(_Model):
    item_ids: list[int] = Field(description="The user's past items, oldest first; ids 1..num_items (GET /v1/model).")
    ratings: list[int] | None = Field(None, description="One per item (0 = unknown, 1..num_ratings); null = all 0.")
    timestamps: list[int] = Field(description="One per item, seconds (>= 0).")


class UserRequest(_Model):
    user_id: str | None = Field(None, max_length=256, description="Part of the cache key; null = anonymous.")
    history: History
    query_time: int | None = Field(None, description="Seconds; null = the last history timestamp. Floored to the "
                                                     "bundle's serving.time_granularity_s.")
    contextual_ids: list[int] | None = Field(None, description="Exactly contextual_len ids (GET /v1/model) when the "
                                                               "model has contextual rows; else null.")


class RankRequest(UserRequest):
    candidates: list[int] = Field(description="Items to score, ids 1..num_items; any count (scored in groups of "
                                              "max_targets against one history pass).")


class RetrieveRequest(UserRequest):
    k: int = Field(10, ge=1, le=MAX_K, description="How many items to return.")
    exclude_seen: bool = Field(True, description="Leave out items already in the history.")


class ModelRef(BaseModel):
    name: str
    version: str
    engine: str


class ScoredItem(BaseModel):
    item_id: int
    scores: dict[str, float] = Field(description="Probability per ranking task.")


class RankResponse(BaseModel):
    results: list[ScoredItem] = Field(description="Every candidate, sorted by the first task's probability, highest first.")
    model: ModelRef
    cache: Literal["hit", "miss", "off"]
    truncated: bool = Field(description="True when older history rows were dropped to fit max_history_len.")
    timing_ms: dict[str, float]


class RetrievedItem(BaseModel):
    item_id: int
    score: float = Field(description="Dot product of the query embedding and the item's (both L2-normalized).")


class RetrieveResponse(BaseModel):
    results: list[RetrievedItem]
    model: ModelRef
    truncated: bool
    timing_ms: dict[str, float]


class ErrorBody(BaseModel):
    error: str = Field(description="One line: what was wrong and what to do.")
    field: str | None = Field(None, description="The offending request field (dotted path), when there is one.")
    request_id: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    engine: str


class ModelLimits(BaseModel):
    num_items: int
    num_ratings: int
    max_history_len: int
    max_targets: int
    contextual_len: int
    contextual_cardinality: int
    time_granularity_s: int


class ModelInfo(BaseModel):
    name: str
    version: str
    created_utc: str
    recipe_sha256: str
    tasks: list[str]
    limits: ModelLimits
    runner: dict = Field(description="The runner's own description: runner, engine, why this engine, cache, batching.")
