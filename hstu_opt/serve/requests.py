"""Request validation and normalization, in one place for every runner (native and vLLM).

API request (schemas) -> RankInput / RetrieveInput: lists become int64 arrays, every id is checked
against the bundle, histories longer than max_history_len keep their most recent rows, and the query
time (the last history timestamp when not given) is floored to serving.time_granularity_s. A bad
field raises InvalidRequest naming it; the routes answer 422 with that line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybase64

from hstu_opt.errors import HstuOptError
from hstu_opt.serve.cache_keys import parse_history_ref
from hstu_opt.serve.runners.base import RankInput, RetrieveInput
from hstu_opt.serve.schemas import (BINARY_FIELDS, BINARY_HEADER, INT64_MAX, BinaryArray, RankRequest, RequestLimits,
                                    RetrieveRequest, UserRequest)

Arrays = dict[str, np.ndarray]  # a request's binary arrays by field path (binary_arrays)


class InvalidRequest(HstuOptError):
    """A request field is wrong; `field` is its dotted path (e.g. history.item_ids[3])."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field




def int_array(values: list[int] | str | BinaryArray, field: str, binary: Arrays | None = None) -> np.ndarray:
    """A JSON integer list, the packed form (base64 of little-endian int64) or the binary form (its array
    in `binary`, from binary_arrays) -> int64 [n]."""
    if isinstance(values, str):
        return packed_array(values, field)
    if isinstance(values, BinaryArray):
        return binary[field]
    try:
        return np.asarray(values, dtype=np.int64).reshape(-1)  # [n]
    except OverflowError:
        raise InvalidRequest(field, "a value does not fit in a signed 64-bit integer") from None


def pack_int64(values) -> str:
    """The packed form a client sends (packed_array's inverse): base64 of the values as little-endian int64."""
    return pack(values, "<i8")


def pack(values, dtype: str) -> str:
    """base64 of `values` as `dtype` (e.g. "<i8", "<f4"): packed request arrays and packed results."""
    return pybase64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode()


def packed_array(text: str, field: str) -> np.ndarray:
    """Strict base64 (no whitespace, exact padding) of little-endian int64 -> int64 [n]. pybase64's SIMD
    decoder: CPython's binascii takes about 0.1 ms per 4096-row array, a quarter of the server's own
    per-request Python (benchmarks/serve_overhead.py); pybase64 takes 3 us."""
    try:
        raw = pybase64.b64decode(text, validate=True)
    except (ValueError, TypeError):  # (binascii.Error is a ValueError)
        raise InvalidRequest(field, "is a string but not base64: send a list of integers, or base64 of "
                                    "little-endian int64 values") from None
    if len(raw) % 8:
        raise InvalidRequest(field, f"packed form decodes to {len(raw)} bytes, not a multiple of 8: pack "
                                    "int64 values (numpy: a.astype('<i8').tobytes())")
    return np.frombuffer(bytearray(raw), dtype="<i8").astype(np.int64, copy=False)  # [n], writable


def split_binary(raw: bytes, header: str | None) -> tuple[bytes, bytes | None]:
    """A request body -> (its JSON request, its binary section; None without one). `header`: the request's
    Inference-Header-Content-Length (None: the whole body is JSON)."""
    if header is None:
        return raw, None
    n = int(header) if header.isascii() and header.isdigit() else -1
    if not 0 < n <= len(raw):
        raise InvalidRequest(BINARY_HEADER, f"is {header[:40]!r}: give the length in bytes of the JSON request at the "
                                            f"start of the body (1..{len(raw)}), the binary arrays after it")
    return raw[:n], raw[n:]


def binary_arrays(req: UserRequest, section: bytes | None) -> Arrays:
    """The arrays a request sends in its body's binary section ({"binary_data_size": bytes} in the JSON), by
    field path: little-endian int64, back to back in BINARY_FIELDS order, filling the section exactly."""
    given = [(f, v) for f in BINARY_FIELDS if isinstance(v := _field(req, f), BinaryArray)]
    if not given:
        if section:
            raise InvalidRequest("body", f"has {len(section)} bytes after its JSON request but no field is binary "
                                         f"({{\"binary_data_size\": n}}): send them with one, or drop {BINARY_HEADER}")
        return {}
    if section is None:
        raise InvalidRequest(given[0][0], f"is binary_data_size, but the body has no binary section: send the JSON "
                                          f"request's length in the {BINARY_HEADER} header, the arrays' bytes after it")
    for f, v in given:
        if v.binary_data_size % 8:
            raise InvalidRequest(f, f"binary_data_size {v.binary_data_size} is not a multiple of 8: send int64 "
                                    "values (numpy: a.astype('<i8').tobytes())")
    declared = sum(v.binary_data_size for _, v in given)
    if declared != len(section):
        raise InvalidRequest("body", f"its binary section has {len(section)} bytes, its binary fields declare "
                                     f"{declared} ({', '.join(f for f, _ in given)}, in that order): make them agree")
    buf, out, at = bytearray(section), {}, 0  # (one copy: writable arrays, as the other forms give)
    for f, v in given:
        n = v.binary_data_size // 8
        out[f] = np.frombuffer(buf, "<i8", n, at) if n else np.zeros(0, np.int64)  # [n]
        at += 8 * n
    return out


def _field(req: UserRequest, path: str):
    """A request's value at a dotted field path (None where a parent is absent)."""
    node = req
    for name in path.split("."):
        node = getattr(node, name, None)
    return node


def check_range(values: np.ndarray, lo: int, hi: int, field: str, what: str) -> None:
    if not values.size or (values.min() >= lo and values.max() <= hi):  # (two reductions: a third of the
        return                                                          # time of a mask, on every request)
    bad = np.flatnonzero((values < lo) | (values > hi))
    if bad.size:
        i = int(bad[0])
        span = f"below {lo}" if hi == INT64_MAX else f"outside {lo}..{hi}"
        raise InvalidRequest(f"{field}[{i}]", f"{what} {int(values[i])} is {span}")


def floor_time(t: int, granularity_s: int) -> int:
    return t - t % granularity_s


@dataclass(frozen=True)
class _History:
    item_ids: np.ndarray  # [H] int64
    ratings: np.ndarray  # [H]
    timestamps: np.ndarray  # [H]
    query_time: int  # floored
    contextual_ids: np.ndarray | None  # [C]
    truncated: bool


def _history(req: UserRequest, lim: RequestLimits, binary: Arrays) -> _History:
    h = req.history
    ids = int_array(h.item_ids, "history.item_ids", binary)
    if ids.size == 0:
        raise InvalidRequest("history.item_ids", "is empty: send at least one past item")
    check_range(ids, 1, lim.num_items, "history.item_ids", "item id")
    ts = _same_length(int_array(h.timestamps, "history.timestamps", binary), ids, "history.timestamps", "timestamp")
    check_range(ts, 0, INT64_MAX, "history.timestamps", "timestamp")
    ratings = np.zeros_like(ids)
    if h.ratings is not None:
        ratings = _same_length(int_array(h.ratings, "history.ratings", binary), ids, "history.ratings", "rating")
        check_range(ratings, 0, lim.num_ratings, "history.ratings", "rating")
    qt = int(ts[-1]) if req.query_time is None else req.query_time
    if not 0 <= qt <= INT64_MAX:
        raise InvalidRequest("query_time", f"{qt} is outside 0..2^63-1 (seconds)")
    keep = slice(max(0, ids.size - lim.max_history_len), None)  # the most recent rows
    return _History(ids[keep], ratings[keep], ts[keep], floor_time(qt, lim.time_granularity_s),
                    _contextual(req.contextual_ids, lim), ids.size > lim.max_history_len)


def _same_length(values: np.ndarray, ids: np.ndarray, field: str, what: str) -> np.ndarray:
    if values.size != ids.size:
        raise InvalidRequest(field, f"has {values.size} rows but history.item_ids has {ids.size}: give one {what} per item")
    return values


def _contextual(values: list[int] | None, lim: RequestLimits) -> np.ndarray | None:
    C = lim.contextual_len
    if C == 0:
        if values:
            raise InvalidRequest("contextual_ids", f"this model has no contextual rows; got {len(values)} ids: omit it")
        return None
    if values is None or len(values) != C:
        got = "none" if values is None else len(values)
        raise InvalidRequest("contextual_ids", f"this model takes exactly {C} contextual ids, got {got}")
    ctx = int_array(values, "contextual_ids")
    check_range(ctx, 1, lim.contextual_cardinality, "contextual_ids", "contextual id")
    return ctx


def rank_input(req: RankRequest, lim: RequestLimits, history_refs: bool = False,
               binary: bytes | None = None) -> RankInput:
    """history_refs: whether the runner takes a history by reference (Runner.history_refs); binary: the
    body's binary section (split_binary), where the request sends arrays that way."""
    arrays = binary_arrays(req, binary)
    if req.history_ref is not None:
        return _by_reference(req, _candidates(req, lim, arrays), history_refs)
    if req.history is None:
        raise InvalidRequest("history", "is missing: send the user's history (or a history_ref from an earlier response)")
    h = _history(req, lim, arrays)
    return RankInput(req.user_id, h.item_ids, h.ratings, h.timestamps, _candidates(req, lim, arrays), h.query_time,
                     h.contextual_ids, h.truncated)


def _candidates(req: RankRequest, lim: RequestLimits, binary: Arrays) -> np.ndarray:
    cands = int_array(req.candidates, "candidates", binary)
    if cands.size == 0:
        raise InvalidRequest("candidates", "is empty: send at least one item to score")
    check_range(cands, 1, lim.num_items, "candidates", "item id")
    return cands


def _by_reference(req: RankRequest, cands: np.ndarray, history_refs: bool) -> RankInput:
    """A rank request naming a cached history: the reference holds the history, contextual ids and query time."""
    for name in ("history", "query_time", "contextual_ids"):
        if getattr(req, name) is not None:
            raise InvalidRequest(name, "must be absent with history_ref (the reference stands for the history, its "
                                       "contextual ids and its query time): send one or the other")
    if not history_refs:
        raise InvalidRequest("history_ref", "this server keeps no user cache (--cache-gb 0, an engine without the "
                                            "cached path, or the vllm runner): send the history")
    parsed = parse_history_ref(req.user_id, req.history_ref)
    if parsed is None:
        raise InvalidRequest("history_ref", "is not a reference this server issues (a rank response's history_ref, "
                                            "sent with the same user_id): send the history")
    key, truncated = parsed
    none = np.zeros(0, np.int64)
    return RankInput(req.user_id, none, none, none, cands, key[2], None, truncated, ref=key)


def retrieve_input(req: RetrieveRequest, lim: RequestLimits, binary: bytes | None = None) -> RetrieveInput:
    h = _history(req, lim, binary_arrays(req, binary))
    return RetrieveInput(req.user_id, h.item_ids, h.ratings, h.timestamps, h.query_time, h.contextual_ids, h.truncated)
