"""Paired comparison of two scorers on one evaluation set: the INT8 (and any reduced-precision) accuracy gate.

Why not the point change of NDCG@10: on ML-100k's ~900 test users NDCG@10 rests on a few dozen hits, so a
handful of users crossing rank 10 moves it by about 1% either way, and a 1% bar on it decided on noise
(issue 16). The gate therefore decides on quantities every user contributes to, compared pairwise:

  * retrieval: per-user NDCG over the full ranking, 1 / log2(rank + 2) of the held-out item (continuous in
    its rank, so a small score change moves it a little instead of flipping a hit);
  * ranking: AUC of each task over all scored (user, candidate) pairs.

For each, the relative change (int8 - fp32) / fp32 gets a paired bootstrap over users (both scorers see
the same resampled users; `resamples` replicates, fixed seed), and the gate passes when the lower end of
its `confidence` interval is at least -bar: the data must show that any loss is within the bar (a
non-inferiority test), so a harmless graph passes with a tight interval and a harmful one fails.
"""

from __future__ import annotations

import numpy as np

from hstu_opt.data.metrics import Outputs, Scorer, auc, point_metrics
from hstu_opt.data.metrics import collect as metrics_collect
from hstu_opt.data.splits import EvalSet

TOP_K = 10


def collect(eval_set: EvalSet, scorer: Scorer, batch_size: int = 256) -> Outputs:
    """metrics.collect, with each user's top-TOP_K items (the agreement report's overlap)."""
    return metrics_collect(eval_set, scorer, batch_size, topk=TOP_K)


def metrics(eval_set: EvalSet, out: Outputs, tasks: tuple[str, ...]) -> dict[str, float]:
    """The usual point metrics (what `evaluate` reports), plus full-ranking NDCG."""
    return {**point_metrics(eval_set, out, tasks, TOP_K), "ndcg_full": float(full_ndcg(out.ranks).mean())}


def full_ndcg(ranks: np.ndarray) -> np.ndarray:
    return 1.0 / np.log2(ranks + 2.0)


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC (ties half) of one score vector [n] under each row of weights [R, n] (a row's multiplicities):
    one sort, then per replicate a cumulative sum over tie groups."""
    order = np.argsort(scores, kind="mergesort")
    s, y, w = scores[order], labels[order].astype(bool), weights[:, order]
    starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # first index of each tie group
    pos = np.add.reduceat(w * y, starts, axis=1)  # [R, G]
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each group
    num = (pos * (below + 0.5 * neg)).sum(axis=1)
    return num / np.maximum(pos.sum(axis=1) * neg.sum(axis=1), 1e-30)


def user_counts(num_users: int, resamples: int, seed: int) -> np.ndarray:
    """[R, U] multiplicities of a bootstrap over users (multinomial: U draws with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_users, np.full(num_users, 1.0 / num_users), size=resamples).astype(np.float64)


def paired_gate(eval_set: EvalSet, base: Outputs, test: Outputs, tasks: tuple[str, ...], bar: float,
                resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict:
    """{metric: {base, test, relative_change, ci: [lo, hi], passed}} plus `passed` overall and the agreement
    of the two scorers' outputs. See the module docstring for the rule."""
    counts = user_counts(len(base.ranks), resamples, seed)
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    gated = {}
    g0, g1 = full_ndcg(base.ranks), full_ndcg(test.ranks)
    gated["ndcg_full"] = _summary(float(g0.mean()), float(g1.mean()), (counts @ (g1 - g0)) / (counts @ g0), lo_q, hi_q, bar)
    per_row = np.repeat(np.arange(len(base.ranks)), base.probs.shape[1])  # the user of each scored pair
    for t, name in enumerate(tasks):
        y = eval_set.labels[..., t].ravel()
        p0, p1 = base.probs[..., t].ravel().astype(np.float64), test.probs[..., t].ravel().astype(np.float64)
        rel = np.concatenate([_auc_rel(y, p0, p1, counts[i:i + 100][:, per_row]) for i in range(0, resamples, 100)])
        gated[f"auc_{name}"] = _summary(auc(y, p0), auc(y, p1), rel, lo_q, hi_q, bar)
    return {"gated": gated, "passed": all(m["passed"] for m in gated.values()), "agreement": agreement(base, test)}


def _auc_rel(y: np.ndarray, p0: np.ndarray, p1: np.ndarray, w: np.ndarray) -> np.ndarray:
    a0 = weighted_auc(y, p0, w)
    return (weighted_auc(y, p1, w) - a0) / a0


def _summary(base: float, test: float, replicates: np.ndarray, lo_q: float, hi_q: float, bar: float) -> dict:
    lo, hi = np.percentile(replicates, [lo_q, hi_q])
    return {"base": base, "test": test, "relative_change": (test - base) / base if base else 0.0,
            "ci": [float(lo), float(hi)], "passed": bool(lo >= -bar)}


def agreement(base: Outputs, test: Outputs) -> dict:
    """How close the outputs are, whatever the labels: probability differences and top-10 overlap."""
    diff = np.abs(test.probs.astype(np.float64) - base.probs)
    overlap = [len(set(a) & set(b)) / TOP_K for a, b in zip(base.topk, test.topk)]
    return {"prob_max_abs_diff": float(diff.max()), "prob_mean_abs_diff": float(diff.mean()),
            f"top{TOP_K}_overlap_mean": float(np.mean(overlap)), "rank_changed_users": int((base.ranks != test.ranks).sum()),
            "users": int(len(base.ranks))}
