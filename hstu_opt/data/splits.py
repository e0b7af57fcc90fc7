"""Leave-one-out evaluation sets: the last row of each user is the test target, the second-to-last
the validation target; the history is everything before the target (most recent max_history rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from hstu_opt.data.batching import PaddedBatch, padded_batch, task_labels
from hstu_opt.data.sequences import Sequences


@dataclass
class EvalSet:
    users: np.ndarray  # [U]
    targets: np.ndarray  # [U] the held-out item
    cands: np.ndarray  # [U, 1 + K] held-out item first, then sampled negatives
    labels: np.ndarray  # [U, 1 + K, T]
    seqs: Sequences
    split: str
    max_history: int

    def batches(self, batch_size: int, hist_width: int | None = None) -> Iterator[tuple[slice, PaddedBatch]]:
        """Batches of the padded contract; `hist_width` pads every history to that width (calibrators
        that stack batches need one shape)."""
        back = 1 if self.split == "test" else 2
        for start in range(0, len(self.users), batch_size):
            sl = slice(start, start + batch_size)
            hist, qt = [], []
            for u in self.users[sl]:
                end = len(self.seqs.items[u]) - back
                lo = max(0, end - self.max_history)
                hist.append((self.seqs.items[u][lo:end], self.seqs.ratings[u][lo:end], self.seqs.timestamps[u][lo:end]))
                qt.append(self.seqs.timestamps[u][end])
            yield sl, padded_batch(hist, list(self.cands[sl]), np.array(qt), self.seqs.contextual[self.users[sl]],
                                   hist_width=hist_width)


def leave_one_out(seqs: Sequences, split: Literal["val", "test"], *, max_history: int, num_negatives: int,
                  tasks: tuple[str, ...], seed: int, max_users: int | None = None) -> EvalSet:
    back = 1 if split == "test" else 2
    rng = np.random.default_rng([seed, back])
    users = np.arange(seqs.num_users)
    if max_users is not None and max_users < len(users):
        users = np.sort(rng.choice(users, max_users, replace=False))
    pos = np.array([seqs.items[u][-back] for u in users])
    rating = np.array([seqs.ratings[u][-back] for u in users])
    negs = rng.integers(1, seqs.num_items + 1, (len(users), num_negatives))
    cands = np.concatenate([pos[:, None], negs], axis=1)
    watched = np.zeros(cands.shape, bool)
    watched[:, 0] = True
    ratings = np.zeros(cands.shape, np.int64)
    ratings[:, 0] = rating
    labels = task_labels(tasks, watched.reshape(-1), ratings.reshape(-1)).reshape(*cands.shape, len(tasks))
    return EvalSet(users, pos, cands, labels, seqs, split, max_history)
