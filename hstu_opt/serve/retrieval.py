"""Top-k over the bundle's item table for /v1/retrieve (the runner returns the query embedding)."""

from __future__ import annotations

import numpy as np


class ItemIndex:
    def __init__(self, table: np.ndarray):
        self.table = table  # [num_items, D] float32, row i = item i+1, L2-normalized

    def top_k(self, query: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """query [D] -> (item ids [k'], scores [k']) best first; k' = k unless fewer items remain."""
        scores = self.table @ query.astype(np.float32)  # [num_items]
        allowed = np.ones(len(scores), bool)
        if exclude is not None:
            allowed[exclude - 1] = False
        idx = np.flatnonzero(allowed)
        k = min(k, idx.size)
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        top = idx[np.argpartition(-scores[idx], k - 1)[:k]]
        top = top[np.argsort(-scores[top], kind="stable")]
        return top + 1, scores[top]
