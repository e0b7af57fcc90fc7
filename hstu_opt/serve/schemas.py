"""The HTTP API contract: pydantic request and response models (what /openapi.json publishes).

Types and static bounds live here; checks that depend on the bundle (item ids in 1..num_items, the
contextual row count) and between fields (list lengths) live in hstu_opt.serve.requests, shared by
every runner. Imports pydantic only (no fastapi), so runners and tests can use it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

if TYPE_CHECKING:
    from hstu_opt.model.config import HstuConfig

MAX_K = 1000  # most items one /v1/retrieve returns


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


# A long integer list may instead be sent packed: base64 of little-endian int64 values
# (hstu_opt.serve.requests.pack_int64; numpy: base64.b64encode(a.astype("<i8").tobytes())). A 4096-row
# history then parses in about a tenth of the time of a JSON list (docs/serving.md, "Packed arrays"); hstu_opt.serve.requests.int_array decodes it.
# base64 of whole int64 values: 32 characters per 3 values, then 11 + "=" (one more) or 22 + "==" (two)
BASE64 = r"^(?:[A-Za-z0-9+/]{32})*(?:[A-Za-z0-9+/]{11}=|[A-Za-z0-9+/]{22}==)?$"
# The pattern is published, not run by pydantic: on a 44 KB string its regex cost 0.07 ms per field, and the
# decoder (requests.packed_array) enforces the same rule anyway (strict base64, whole int64 values: 422).
Packed = Annotated[str, Field(json_schema_extra={
    "pattern": BASE64, "contentEncoding": "base64", "description": "Packed: base64 of little-endian int64 values."})]


class BinaryArray(_Model):
    """An integer array sent raw in the request body's binary section (Triton / KServe v2's binary data
    extension): the body is the JSON request, Inference-Header-Content-Length bytes of it, followed by the
    arrays given this way, back to back as little-endian int64, in BINARY_FIELDS order. No text to scan or
    decode: a 4096-row history costs a JSON header and three array views (docs/serving.md, "Binary bodies")."""

    binary_data_size: int = Field(ge=0, le=2**40, description="The array's size in bytes in the binary section "
                                                              "(8 per value: little-endian int64).")


# The fields that may be binary, in the order their bytes follow the JSON header (hstu_opt.serve.requests.binary_arrays)
BINARY_FIELDS = ("history.item_ids", "history.ratings", "history.timestamps", "candidates")
BINARY_HEADER = "Inference-Header-Content-Length"  # the JSON header's length in bytes (Triton's name for it)


def _int64s_form(v) -> str:
    return "packed" if isinstance(v, str) else "binary" if isinstance(v, (dict, BinaryArray)) else "list"


# A string picks the packed form, an object the binary form, anything else the list, so a bad value gets
# one error (from its form); the form's tag in the error location is dropped again by middleware.field_path.
UNION_TAGS = ("list", "packed", "binary")
Int64s = Annotated[Union[Annotated[list[int], Tag("list")], Annotated[Packed, Tag("packed")],  # noqa: UP007
                         Annotated[BinaryArray, Tag("binary")]],
                   Discriminator(_int64s_form)]


class History(_Model):
    item_ids: Int64s = Field(description="The user's past items, oldest first; ids 1..num_items (GET /v1/model).")
    ratings: Int64s | None = Field(None, description="One per item (0 = unknown, 1..num_ratings); null = all 0.")
    timestamps: Int64s = Field(description="One per item, seconds (>= 0).")


class UserRequest(_Model):
    user_id: str | None = Field(None, max_length=256, description="Part of the cache key; null = anonymous.")
    history: History
    query_time: int | None = Field(None, description="Seconds; null = the last history timestamp. Floored to the "
                                                     "bundle's serving.time_granularity_s.")
    contextual_ids: list[int] | None = Field(None, description="Exactly contextual_len ids (GET /v1/model) when the "
                                                               "model has contextual rows; else null.")


ResultsLayout = Literal["items", "columns", "packed"]  # how a rank response lists the candidates (RankResponse)


HISTORY_REF = r"^([0-9a-f]{64})\.([0-9]{1,19})\.([01])$"  # cache_keys.history_ref's token: digest, time, truncated


class RankRequest(UserRequest):
    history: History | None = Field(None, description="The user's history; or null with history_ref.")
    history_ref: str | None = Field(
        None, max_length=100, json_schema_extra={"pattern": HISTORY_REF},
        description="Instead of history (and query_time, contextual_ids): the history_ref of an earlier rank "
                    "response for the same user_id, naming its cached history; 409 when the cache no longer "
                    "holds it (send the history again).")
    candidates: Int64s = Field(description="Items to score, ids 1..num_items; any count (scored in groups of "
                                              "max_targets against one history pass).")
    results_layout: ResultsLayout = Field(
        "items", description="How the response lists the scored candidates: 'items', `results` with one object per "
                             "candidate; 'columns', `columns` with one list per field (item ids, each task's scores) "
                             "in the same order, cheaper to build and to decode for many candidates; 'packed', "
                             "`packed` with the same columns as base64 (item ids: little-endian int64, scores: "
                             "little-endian float32, the engine's values bit for bit), cheapest of the three.")


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


class RankColumns(BaseModel):
    item_id: list[int] = Field(description="Every candidate, sorted by the first task's probability, highest first.")
    scores: dict[str, list[float]] = Field(description="Per ranking task, the probabilities in item_id's order.")


class RankPacked(BaseModel):
    item_id: str = Field(description="base64 of little-endian int64: every candidate, sorted by the first task's "
                                     "probability, highest first (numpy: np.frombuffer(b64decode(s), '<i8')).",
                         json_schema_extra={"contentEncoding": "base64"})
    scores: dict[str, str] = Field(description="Per ranking task, base64 of little-endian float32: the probabilities "
                                               "in item_id's order (numpy: np.frombuffer(b64decode(s), '<f4')).")


class RankResponse(BaseModel):
    results: list[ScoredItem] | None = Field(None, description="With results_layout 'items' (the default): every "
                                             "candidate, sorted by the first task's probability, highest first.")
    columns: RankColumns | None = Field(None, description="With results_layout 'columns' (instead of results): the "
                                        "same candidates in the same order, one list per field.")
    packed: RankPacked | None = Field(None, description="With results_layout 'packed' (instead of results): the "
                                      "same columns as base64 arrays.")
    model: ModelRef
    cache: Literal["hit", "miss", "off"]
    truncated: bool = Field(description="True when older history rows were dropped to fit max_history_len.")
    history_ref: str | None = Field(None, description="While the user cache holds this history: a token naming it; "
                                                      "send it as history_ref (same user_id) instead of the history.")
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


@dataclass(frozen=True)
class RequestLimits:
    """What the bundle's model accepts: every request is checked against it (requests.py), GET /v1/model
    reports it, and the published schema carries its id ranges."""

    num_items: int
    num_ratings: int
    max_history_len: int
    max_targets: int
    contextual_len: int
    contextual_cardinality: int
    time_granularity_s: int

    @classmethod
    def from_config(cls, cfg: HstuConfig, time_granularity_s: int) -> RequestLimits:
        return cls(cfg.num_items, cfg.num_ratings, cfg.max_history_len, cfg.max_targets, cfg.contextual_len,
                   cfg.contextual_cardinality, time_granularity_s)


class ModelInfo(BaseModel):
    name: str
    version: str
    created_utc: str
    recipe_sha256: str
    tasks: list[str]
    limits: RequestLimits
    runner: dict = Field(description="The runner's own description: runner, engine, why this engine, cache, batching.")


# ---- the bundle's bounds in the published schema ------------------------------------------------
INT64_MAX = 2**63 - 1


def _variants(prop: dict) -> list[dict]:
    """The alternatives of a property (anyOf / oneOf, nested: e.g. a nullable list-or-packed field)."""
    alts = prop.get("anyOf") or prop.get("oneOf")
    return [v for alt in alts for v in _variants(alt)] if alts else [prop]


def _bound_ints(prop: dict, lo: int, hi: int, min_items: int | None = None, max_items: int | None = None) -> None:
    """Bounds on an integer (or on the items of an integer array) property, in each anyOf variant."""
    for v in _variants(prop):
        if v.get("type") == "array":
            v["items"].update(minimum=lo, maximum=hi)
            v.update({k: n for k, n in (("minItems", min_items), ("maxItems", max_items)) if n is not None})
        elif v.get("type") == "integer":
            v.update(minimum=lo, maximum=hi)


def openapi_with_limits(openapi: dict, limits) -> dict:
    """The bundle's id ranges and contextual row count (a RequestLimits), written into the OpenAPI
    document, so clients and generated tests see them. List lengths that must match (ratings and
    timestamps per item) are beyond JSON Schema: the server checks those (422)."""
    comps = openapi["components"]["schemas"]
    hist = comps["History"]["properties"]
    _bound_ints(hist["item_ids"], 1, limits.num_items, min_items=1)
    _bound_ints(hist["ratings"], 0, limits.num_ratings)
    _bound_ints(hist["timestamps"], 0, INT64_MAX, min_items=1)
    C = limits.contextual_len
    for name in ("RankRequest", "RetrieveRequest"):
        props = comps[name]["properties"]
        _bound_ints(props["query_time"], 0, INT64_MAX)
        if C:  # exactly C ids, no null
            props["contextual_ids"] = {**_variants(props["contextual_ids"])[0], "description": props["contextual_ids"]["description"]}
            _bound_ints(props["contextual_ids"], 1, limits.contextual_cardinality, C, C)
        else:
            _bound_ints(props["contextual_ids"], 0, 0, max_items=0)
    _bound_ints(comps["RankRequest"]["properties"]["candidates"], 1, limits.num_items, min_items=1)
    return openapi
