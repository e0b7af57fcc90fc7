"""Batches: jagged (training) and padded (the engine input contract, used for evaluation and serving)."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from hstu_opt.data.sequences import Sequences

# The engine input contract, in graph input order. contextual_ids only when contextual_len > 0.
RANKING_INPUTS = ("hist_ids", "hist_ratings", "hist_timestamps", "hist_lengths", "cand_ids", "num_candidates", "query_time")
RETRIEVAL_INPUTS = ("hist_ids", "hist_ratings", "hist_timestamps", "hist_lengths", "query_time")


def task_labels(tasks: tuple[str, ...], watched: np.ndarray, rating: np.ndarray) -> np.ndarray:
    """watched: was it interacted with; liked: rating >= 4. -> [n, T] float32."""
    cols = {"watched": watched.astype(np.float32), "liked": (watched & (rating >= 4)).astype(np.float32)}
    return np.stack([cols[t] for t in tasks], axis=-1)


@dataclass
class JaggedBatch:
    ids: torch.Tensor  # [L]; contextual rows carry their feature id
    ratings: torch.Tensor  # [L]
    timestamps: torch.Tensor  # [L]
    offsets: torch.Tensor  # [B+1]
    num_targets: torch.Tensor  # [B]
    query_time: torch.Tensor  # [B]
    next_item: torch.Tensor  # [L]: the item that followed each history row (0 = none)
    target_labels: torch.Tensor  # [sum(num_targets), T]

    def to(self, device: torch.device | str) -> "JaggedBatch":
        return JaggedBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def training_batch(seqs: Sequences, users: np.ndarray, rng: np.random.Generator, max_history: int,
                   num_negatives: int, tasks: tuple[str, ...]) -> JaggedBatch:
    """Each user: a random cut c in its training part; history = the rows before c, targets = item c
    (the positive, labelled from its rating) plus random negatives."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("ids", "ratings", "ts", "next", "labels")}
    lengths, ntgt, qtime = [], [], []
    for u in users:
        items, ratings, ts = seqs.items[u], seqs.ratings[u], seqs.timestamps[u]
        n_train = len(items) - 2
        c = int(rng.integers(max(1, n_train // 2), n_train)) if n_train > 1 else 1
        lo = max(0, c - max_history)
        cands = np.r_[items[c], rng.integers(1, seqs.num_items + 1, num_negatives)]
        ctx = seqs.contextual[u]
        C, H, T = len(ctx), c - lo, len(cands)
        parts["ids"].append(np.r_[ctx, items[lo:c], cands])
        parts["ratings"].append(np.r_[np.zeros(C, np.int64), ratings[lo:c], np.zeros(T, np.int64)])
        parts["ts"].append(np.r_[np.full(C, ts[c]), ts[lo:c], np.full(T, ts[c])])
        parts["next"].append(np.r_[np.zeros(C, np.int64), items[lo + 1 : c + 1], np.zeros(T, np.int64)])
        watched = np.zeros(T, bool)
        watched[0] = True
        parts["labels"].append(task_labels(tasks, watched, np.r_[ratings[c], np.zeros(T - 1, np.int64)]))
        lengths.append(C + H + T)
        ntgt.append(T)
        qtime.append(ts[c])
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return JaggedBatch(
        ids=torch.from_numpy(cat["ids"].astype(np.int64)), ratings=torch.from_numpy(cat["ratings"].astype(np.int64)),
        timestamps=torch.from_numpy(cat["ts"].astype(np.int64)),
        offsets=torch.from_numpy(np.r_[0, np.cumsum(lengths)].astype(np.int64)),
        num_targets=torch.tensor(ntgt, dtype=torch.int64), query_time=torch.tensor(qtime, dtype=torch.int64),
        next_item=torch.from_numpy(cat["next"].astype(np.int64)), target_labels=torch.from_numpy(cat["labels"]),
    )


@dataclass
class PaddedBatch:
    """The engine contract: right-padded history and candidates, lengths, and the request time."""

    hist_ids: np.ndarray  # [B, Nh] int64
    hist_ratings: np.ndarray  # [B, Nh] int64
    hist_timestamps: np.ndarray  # [B, Nh] int64 (seconds)
    hist_lengths: np.ndarray  # [B] int64, >= 1
    cand_ids: np.ndarray  # [B, Nc] int64
    num_candidates: np.ndarray  # [B] int64
    query_time: np.ndarray  # [B] int64 (seconds)
    contextual_ids: np.ndarray  # [B, C] int64

    def ranking_feed(self) -> dict[str, np.ndarray]:
        return self._feed(RANKING_INPUTS)

    def retrieval_feed(self) -> dict[str, np.ndarray]:
        return self._feed(RETRIEVAL_INPUTS)

    def _feed(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        feed = {n: getattr(self, n) for n in names}
        if self.contextual_ids.shape[1] > 0:
            feed["contextual_ids"] = self.contextual_ids
        return feed


def pad_width(rows: list[np.ndarray], width: int | None = None) -> int:
    """The padded width of `rows`: `width` when given, else the longest row's (at least 1)."""
    return max(max((len(r) for r in rows), default=0), 1) if width is None else width


def padded_batch(hist: list[tuple[np.ndarray, np.ndarray, np.ndarray]], cands: list[np.ndarray],
                 query_time: np.ndarray, contextual: np.ndarray, hist_width: int | None = None,
                 cand_width: int | None = None) -> PaddedBatch:
    """hist: (ids, ratings, timestamps) per user; rows right-padded with 0 to the widths given, else the longest."""
    B, contextual = len(hist), np.asarray(contextual, np.int64)
    Nh, Nc = pad_width([h[0] for h in hist], hist_width), pad_width(cands, cand_width)
    out = {name: np.zeros(shape, np.int64) for name, shape in (
        ("hist_ids", (B, Nh)), ("hist_ratings", (B, Nh)), ("hist_timestamps", (B, Nh)), ("hist_lengths", B),
        ("cand_ids", (B, Nc)), ("num_candidates", B), ("query_time", B), ("contextual_ids", contextual.shape))}
    return PaddedBatch(**fill_padded_batch(out, hist, cands, query_time, contextual))


def fill_padded_batch(out: dict[str, np.ndarray], hist: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                      cands: list[np.ndarray], query_time, contextual) -> dict[str, np.ndarray]:
    """padded_batch's fields written in place into `out`'s arrays (name -> array of the padded widths; only
    the names `out` holds: an engine's own input buffers, CompiledRunner.feed_buffers). -> out."""
    rows = {"hist_ids": [h[0] for h in hist], "hist_ratings": [h[1] for h in hist],
            "hist_timestamps": [h[2] for h in hist], "cand_ids": cands}
    for name, parts in rows.items():
        if (a := out.get(name)) is not None:  # [B, width]
            for b, r in enumerate(parts):
                a[b, :len(r)] = r
                a[b, len(r):] = 0
    for name, values in (("hist_lengths", [len(h[0]) for h in hist]), ("num_candidates", [len(c) for c in cands]),
                         ("query_time", query_time), ("contextual_ids", contextual)):
        if name in out:
            out[name][...] = values
    return out
