"""Retrieval (HR@K, NDCG@K, full ranking) and ranking (AUC) metrics, and `evaluate` over an EvalSet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from hstu_opt.data.batching import PaddedBatch
from hstu_opt.data.splits import EvalSet


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """scores: [B, I] for items 1..I; targets: [B] item ids -> 0-based rank (items scored strictly higher)."""
    t = scores[np.arange(len(targets)), targets - 1]
    return (scores > t[:, None]).sum(axis=1)


def hr_ndcg(ranks: np.ndarray, k: int = 10) -> tuple[float, float]:
    hit = ranks < k
    return float(hit.mean()), float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, ties counted half (Mann-Whitney with average ranks)."""
    labels, scores = labels.astype(bool).ravel(), scores.astype(np.float64).ravel()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    uniq, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0  # 1-based average rank of each tie group
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Scorer(Protocol):
    def rank(self, batch: PaddedBatch) -> np.ndarray: ...  # [B, Nc, T] probabilities
    def score_items(self, batch: PaddedBatch) -> np.ndarray: ...  # [B, num_items]


class PopularityScorer:
    """Baseline: every user gets the training popularity of each item."""

    def __init__(self, counts: np.ndarray, num_tasks: int):
        self.counts, self.num_tasks = counts.astype(np.float64), num_tasks

    def rank(self, batch: PaddedBatch) -> np.ndarray:
        return np.repeat(self.counts[batch.cand_ids][..., None], self.num_tasks, axis=-1)

    def score_items(self, batch: PaddedBatch) -> np.ndarray:
        return np.broadcast_to(self.counts[1:], (len(batch.hist_lengths), len(self.counts) - 1))


@dataclass
class Outputs:
    """One scorer's per-user outputs on an EvalSet."""

    ranks: np.ndarray  # [U] 0-based full-ranking rank of the held-out item
    probs: np.ndarray  # [U, Nc, T] ranking probabilities of the candidates
    topk: np.ndarray | None = None  # [U, k] item ids ranked first (collect(topk=k))


def collect(eval_set: EvalSet, scorer: Scorer, batch_size: int = 256, topk: int = 0) -> Outputs:
    ranks, probs, top = [], [], []
    for sl, batch in eval_set.batches(batch_size):
        scores = np.asarray(scorer.score_items(batch))  # [B, I]
        ranks.append(target_ranks(scores, eval_set.targets[sl]))
        if topk:
            top.append(np.argsort(-scores, axis=1, kind="stable")[:, :topk] + 1)
        probs.append(np.asarray(scorer.rank(batch))[:, : eval_set.cands.shape[1]])
    return Outputs(np.concatenate(ranks), np.concatenate(probs), np.concatenate(top) if topk else None)


def point_metrics(eval_set: EvalSet, out: Outputs, tasks: tuple[str, ...], k: int = 10) -> dict[str, float]:
    hr, ndcg = hr_ndcg(out.ranks, k)
    res = {f"hr@{k}": hr, f"ndcg@{k}": ndcg}
    for t, name in enumerate(tasks):
        res[f"auc_{name}"] = auc(eval_set.labels[..., t], out.probs[..., t])
    return res


def evaluate(eval_set: EvalSet, scorer: Scorer, tasks: tuple[str, ...], batch_size: int = 256, k: int = 10) -> dict[str, float]:
    return point_metrics(eval_set, collect(eval_set, scorer, batch_size), tasks, k)
