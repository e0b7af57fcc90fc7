"""The paired accuracy gate's statistics (data/agreement.py) on synthetic outputs with a known answer."""

import numpy as np
import pytest

from hstu_opt.data import agreement
from hstu_opt.data.metrics import auc


def test_weighted_auc_equals_auc_of_the_replicated_data():
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.3
    s = np.round(rng.normal(size=300) + y, 1)  # rounded: ties
    w = rng.integers(0, 4, size=(5, 300)).astype(float)
    got = agreement.weighted_auc(y, s, w)
    for r in range(5):
        idx = np.repeat(np.arange(300), w[r].astype(int))
        assert got[r] == pytest.approx(auc(y[idx], s[idx]), abs=1e-12)
    assert agreement.weighted_auc(y, s, np.ones((1, 300)))[0] == pytest.approx(auc(y, s), abs=1e-12)


class _Set:
    def __init__(self, labels):
        self.labels = labels


def _outputs(rng, users=900, cands=16, noise=0.0, ranks=None, probs=None):
    probs = probs if probs is not None else rng.random((users, cands, 1))
    ranks = ranks if ranks is not None else rng.integers(0, 400, users)
    return agreement.Outputs(ranks=ranks, topk=np.tile(np.arange(1, 11), (users, 1)), probs=probs + noise)


def test_gate_passes_identical_and_slightly_perturbed_outputs():
    rng = np.random.default_rng(1)
    base = _outputs(rng)
    labels = (rng.random((900, 16, 1)) < base.probs).astype(np.float32)  # informative scores
    same = agreement.paired_gate(_Set(labels), base, base, ("t",), bar=0.01, resamples=200)
    assert same["passed"] and all(m["ci"] == [0.0, 0.0] for m in same["gated"].values())
    jitter = agreement.Outputs(ranks=base.ranks, topk=base.topk, probs=base.probs + rng.normal(0, 1e-3, base.probs.shape))
    near = agreement.paired_gate(_Set(labels), base, jitter, ("t",), bar=0.01, resamples=200)
    assert near["passed"], near["gated"]
    assert near["agreement"]["prob_max_abs_diff"] < 1e-2


def test_gate_fails_a_real_loss_and_names_the_metric():
    rng = np.random.default_rng(2)
    base = _outputs(rng)
    labels = (rng.random((900, 16, 1)) < base.probs).astype(np.float32)
    worse_ranks = base.ranks + rng.integers(0, 30, 900)  # every user's held-out item drops a little
    worse = agreement.Outputs(ranks=worse_ranks, topk=base.topk, probs=base.probs)
    gate = agreement.paired_gate(_Set(labels), base, worse, ("t",), bar=0.01, resamples=200)
    assert not gate["gated"]["ndcg_full"]["passed"] and gate["gated"]["auc_t"]["passed"]
    assert gate["gated"]["ndcg_full"]["ci"][1] < -0.01
    noisy = agreement.Outputs(ranks=base.ranks, topk=base.topk, probs=base.probs + rng.normal(0, 0.3, base.probs.shape))
    gate = agreement.paired_gate(_Set(labels), base, noisy, ("t",), bar=0.01, resamples=200)
    assert not gate["gated"]["auc_t"]["passed"] and not gate["passed"]
