"""What one vLLM request carries for one HSTU sequence, shared by the IO processor (which writes it)
and the pooler (which reads it).

The prompt's token ids are the sequence's row ids, one token per row:
    [contextual feature ids (C)][history item ids (H)][candidate item ids (M)]
so vLLM's scheduler budgets real rows. The rest of each row (rating, timestamp) and of the request
(query time, candidate count) has no place in a vLLM prompt; it travels in PoolingParams.extra_kwargs
under EXTRA_KEY, the per-request side channel vLLM's own cross-encoder scoring uses
(`compressed_token_type_ids`), which the model's pooler reads from the batch's pooling metadata.
M = 0 asks for the retrieval query embedding instead of ranking probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EXTRA_KEY = "hstu_rows"


@dataclass(frozen=True)
class SeqRows:
    ids: np.ndarray  # [n] int64: [contextual][history][candidates]
    ratings: np.ndarray  # [n] int64: history ratings, 0 on contextual and candidate rows
    timestamps: np.ndarray  # [n] int64: history timestamps, query_time on contextual and candidate rows
    num_targets: int  # M: the trailing candidate rows (0: retrieval)
    query_time: int

    @classmethod
    def build(cls, contextual_ids: np.ndarray | None, item_ids: np.ndarray, ratings: np.ndarray,
              timestamps: np.ndarray, candidates: np.ndarray, query_time: int) -> "SeqRows":
        ctx = np.zeros(0, np.int64) if contextual_ids is None else np.asarray(contextual_ids, np.int64)
        cands = np.asarray(candidates, np.int64)
        pad = np.zeros(len(ctx) + len(cands), np.int64)
        at_query = np.full(len(ctx), query_time, np.int64), np.full(len(cands), query_time, np.int64)
        return cls(
            ids=np.concatenate([ctx, np.asarray(item_ids, np.int64), cands]),
            ratings=np.concatenate([pad[:len(ctx)], np.asarray(ratings, np.int64), pad[len(ctx):]]),
            timestamps=np.concatenate([at_query[0], np.asarray(timestamps, np.int64), at_query[1]]),
            num_targets=len(cands),
            query_time=int(query_time),
        )

    def token_ids(self) -> list[int]:
        return self.ids.tolist()

    def extra_kwargs(self) -> dict:
        """Plain lists and ints: PoolingParams are msgspec-serialized when the engine runs in another process."""
        return {EXTRA_KEY: {"ratings": self.ratings.tolist(), "timestamps": self.timestamps.tolist(),
                            "num_targets": self.num_targets, "query_time": self.query_time}}

    @classmethod
    def from_request(cls, token_ids, extra_kwargs: dict | None) -> "SeqRows | None":
        """None for a request that carries no HSTU rows (vLLM's own warm-up passes)."""
        rows = (extra_kwargs or {}).get(EXTRA_KEY)
        if rows is None:
            return None
        ids = np.asarray(token_ids, np.int64)
        assert len(rows["ratings"]) == len(rows["timestamps"]) == len(ids), "rows and token ids disagree"
        return cls(ids=ids, ratings=np.asarray(rows["ratings"], np.int64),
                   timestamps=np.asarray(rows["timestamps"], np.int64), num_targets=int(rows["num_targets"]),
                   query_time=int(rows["query_time"]))
