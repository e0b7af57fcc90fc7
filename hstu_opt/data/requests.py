"""Random requests in the engine contract, for parity checks and benchmarks (real data is used for
calibration and accuracy; random ids are fine where only numerics or speed are measured)."""

from __future__ import annotations

import numpy as np

from hstu_opt.data.batching import PaddedBatch, padded_batch


def random_requests(rng: np.random.Generator, batch: int, hist_len: int, num_cand: int, *, num_items: int,
                    contextual_len: int = 0, contextual_cardinality: int = 1, exact: bool = False) -> PaddedBatch:
    """`batch` users with histories of 1..hist_len rows and 1..num_cand candidates (exactly those sizes when
    `exact`, as benchmarks want); padded to the batch's longest."""
    hist, cands = [], []
    for _ in range(batch):
        n = hist_len if exact else int(rng.integers(1, hist_len + 1))
        c = num_cand if exact else int(rng.integers(1, num_cand + 1))
        ts = np.sort(rng.integers(1_000_000_000, 1_100_000_000, n))
        hist.append((rng.integers(1, num_items + 1, n), rng.integers(1, 6, n), ts))
        cands.append(rng.integers(1, num_items + 1, c))
    qt = np.array([h[2][-1] + int(rng.integers(0, 10 * 86400)) for h in hist])
    return padded_batch(hist, cands, qt, rng.integers(1, contextual_cardinality + 1, (batch, contextual_len)))
