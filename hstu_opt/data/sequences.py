"""Per-user chronological sequences, the synthetic generator, and the leave-one-out split."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from hstu_opt.data.movielens import Interactions, bundled_ml100k, read_ratings
from hstu_opt.errors import DataError
from hstu_opt.recipe import DataSection, SyntheticSection

NUM_RATINGS = 5


@dataclass
class Sequences:
    """Item ids are remapped to 1..num_items (0 = padding); ratings to 1..5 (0 = unknown)."""

    items: list[np.ndarray]
    ratings: list[np.ndarray]
    timestamps: list[np.ndarray]
    contextual: np.ndarray  # [U, C] contextual feature ids (1..cardinality); C may be 0
    num_items: int
    contextual_cardinality: int
    fingerprint: str

    @property
    def num_users(self) -> int:
        return len(self.items)

    def train_popularity(self) -> np.ndarray:
        """Interaction counts over the training part (all but the last two rows): [num_items + 1]."""
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for items in self.items:
            np.add.at(counts, items[:-2], 1)
        return counts


def from_interactions(inter: Interactions, min_len: int, contextual_len: int) -> Sequences:
    if contextual_len > 1:
        raise DataError("data.source=movielens has one contextual feature (the user id): set model.contextual_len to 0 or 1")
    _, item_idx = np.unique(inter.items, return_inverse=True)
    order = np.lexsort((np.arange(len(inter.users)), inter.timestamps, inter.users))  # stable chronological per user
    users, items = inter.users[order], item_idx[order] + 1
    ratings = np.clip(np.ceil(inter.ratings[order]), 1, NUM_RATINGS).astype(np.int64)
    ts = inter.timestamps[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    bounds = np.r_[starts, len(users)]
    keep = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= min_len]
    if not keep:
        raise DataError(f"no user has >= {min_len} interactions: lower data.min_user_interactions")
    ctx = np.arange(1, len(keep) + 1, dtype=np.int64)[:, None][:, :contextual_len]
    return Sequences(
        items=[items[a:b] for a, b in keep], ratings=[ratings[a:b] for a, b in keep], timestamps=[ts[a:b] for a, b in keep],
        contextual=ctx, num_items=int(item_idx.max()) + 1, contextual_cardinality=max(len(keep), 1),
        fingerprint=inter.fingerprint,
    )


GENERATOR_VERSION = 1


def synthetic(cfg: SyntheticSection, contextual_len: int, seed: int) -> Sequences:
    """Deterministic synthetic histories: Zipf item popularity, users with a taste cluster, a sequential
    'successor' habit (learnable signal), item-quality-driven ratings, log-uniform lengths, timestamps."""
    rng = np.random.default_rng(seed)
    I, K = cfg.num_items, cfg.num_clusters
    pop = 1.0 / np.arange(1, I + 1) ** cfg.zipf_alpha
    pop = pop[rng.permutation(I)] / pop.sum()
    cluster = rng.integers(0, K, I)
    quality = rng.normal(3.5, 0.9, I)
    by_cluster = [np.flatnonzero(cluster == c) for c in range(K)]
    lengths = np.exp(rng.uniform(np.log(cfg.min_len), np.log(cfg.max_len + 1), cfg.num_users)).astype(np.int64)
    items, ratings, stamps = [], [], []
    for u in range(cfg.num_users):
        n, members = int(lengths[u]), by_cluster[rng.integers(0, K)]
        if len(members) == 0:
            members = np.arange(I)
        local = pop[members] / pop[members].sum()
        seq = np.where(rng.random(n) < 0.7, rng.choice(members, n, p=local), rng.choice(I, n, p=pop))
        follow = rng.random(n) < 0.3
        for t in np.flatnonzero(follow[1:]) + 1:
            seq[t] = (seq[t - 1] + 1) % I
        items.append(seq + 1)
        ratings.append(np.clip(np.rint(quality[seq] + rng.normal(0, 0.7, n)), 1, NUM_RATINGS).astype(np.int64))
        stamps.append(1_600_000_000 + rng.integers(0, 365 * 86400) + np.cumsum(rng.exponential(86400, n)).astype(np.int64))
    ctx = rng.integers(1, cfg.contextual_cardinality + 1, (cfg.num_users, contextual_len))
    blob = json.dumps({"cfg": cfg.model_dump(), "C": contextual_len, "seed": seed, "v": GENERATOR_VERSION}, sort_keys=True)
    return Sequences(items, ratings, stamps, ctx, I, cfg.contextual_cardinality, hashlib.sha256(blob.encode()).hexdigest())


def load_sequences(data: DataSection, contextual_len: int) -> Sequences:
    if data.source == "synthetic":
        return synthetic(data.synthetic, contextual_len, data.seed)
    path, fmt = (data.path, data.format) if data.path is not None else (bundled_ml100k(), "inter")
    return from_interactions(read_ratings(path, fmt), data.min_user_interactions, contextual_len)
