"""The user cache's keys, without torch: what the request path, the store and the Python client share.

A key is (user_id, sha256 of the history rows and contextual ids, floored query time), so an entry is
reused only for a request whose prefill would compute the very same K/V; a history_ref token names a
key (with the request's user_id) so a client can send it instead of the history.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from hstu_opt.serve.runners.base import RankInput, RetrieveInput
from hstu_opt.serve.schemas import HISTORY_REF

CacheKey = tuple[str | None, str, int]  # (user_id, sha256 of the history rows, floored query time)


def history_digest(item_ids: np.ndarray, ratings: np.ndarray, timestamps: np.ndarray,
                   contextual_ids: np.ndarray | None) -> str:
    """sha256 over the rows' ids, ratings, timestamps and the contextual ids, each length-prefixed."""
    h = hashlib.sha256()
    for a in (item_ids, ratings, timestamps, np.zeros(0, np.int64) if contextual_ids is None else contextual_ids):
        h.update(np.int64(a.size).tobytes())
        h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
    return h.hexdigest()


def cache_key(req: RankInput | RetrieveInput) -> CacheKey:
    if getattr(req, "ref", None) is not None:  # a request by history_ref names its key
        return req.ref
    return req.user_id, history_digest(req.item_ids, req.ratings, req.timestamps, req.contextual_ids), req.query_time


_REF = re.compile(HISTORY_REF)  # the published pattern (schemas.py), its three parts grouped


def history_ref(key: CacheKey, truncated: bool) -> str:
    """The token a rank response returns for its cached history: the history digest, the floored query time
    and whether the history was truncated. With the same user_id it names the same cache key."""
    return f"{key[1]}.{key[2]}.{int(truncated)}"


def parse_history_ref(user_id: str | None, token: str) -> tuple[CacheKey, bool] | None:
    """(cache key, truncated) of a history_ref token for this user_id; None if it is not one."""
    m = _REF.fullmatch(token)
    return ((user_id, m.group(1), int(m.group(2))), m.group(3) == "1") if m else None
