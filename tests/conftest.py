import contextlib

import numpy as np
import pytest
import torch

# Per-dtype tolerances (atol, rtol) of a fast/low-precision path against a float64 oracle.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1e-2, 2e-2),
}

# End to end through embeddings, 2 STU layers and the head: rounding compounds, so a model-level table.
MODEL_TOLERANCES = {
    torch.float16: (1e-2, 5e-2),
    torch.bfloat16: (5e-2, 1e-1),
}


class SilentReporter:
    def __init__(self):
        self.events = []

    def stage_started(self, name):
        self.events.append(("start", name))

    def stage_finished(self, name, record, cached, seconds):
        self.events.append(("cached" if cached else "ran", name))

    @contextlib.contextmanager
    def task(self, description, total):
        yield lambda n=1: None

    def log(self, message):
        self.events.append(("log", message))

    def ran(self):
        return [n for kind, n in self.events if kind == "ran"]

    def cached(self):
        return [n for kind, n in self.events if kind == "cached"]


@pytest.fixture
def reporter():
    return SilentReporter()


def random_jagged(lengths, num_targets, H, dqk, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = int(sum(lengths))
    offsets = torch.tensor(np.r_[0, np.cumsum(lengths)], dtype=torch.int64)
    q = torch.randn(L, H, dqk, generator=g).to(dtype)
    k = torch.randn(L, H, dqk, generator=g).to(dtype)
    v = torch.randn(L, H, dv, generator=g).to(dtype)
    return q, k, v, offsets, torch.tensor(num_targets, dtype=torch.int64)


MICRO_RECIPE = """\
name: micro
version: "0"
model: {embedding_dim: 16, num_layers: 1, num_heads: 1, attention_dim: 8, linear_dim: 8, max_history_len: 24,
        max_targets: 4, ranking_hidden_dim: 8}
data:
  source: synthetic
  synthetic: {num_users: 40, num_items: 60, min_len: 5, max_len: 24, num_clusters: 4}
train: {epochs: 1, batch_size: 16, num_negatives: 16, ranking_negatives: 2, eval_negatives: 3}
bench: {batch_sizes: [1, 4], history_lengths: [24], candidates: [4], warmup: 1, repeats: 5}
"""


@pytest.fixture
def micro_recipe(tmp_path):
    path = tmp_path / "micro.yaml"
    path.write_text(MICRO_RECIPE)
    return path


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """The real demo job, built once per test session: (bundle dir, {stage name: StageResult})."""
    from pathlib import Path

    from hstu_opt import pipeline
    from hstu_opt.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parent.parent / "recipes" / "tiny.yaml")
    path, results = pipeline.build(recipe, tmp_path_factory.mktemp("tiny"), SilentReporter())
    return path, {r.stage.name: r for r in results}


@pytest.fixture(scope="session")
def tiny_compiled(tiny_build, tmp_path_factory):
    """The tiny checkpoint's `compiled` engine on this CPU, built once per session (tests/backends and
    tests/serve share it: a build is a cold compile plus a warm start, minutes on 2 cores)."""
    from hstu_opt.backends import compiled
    from hstu_opt.model.checkpoint import load_checkpoint

    path, _ = tiny_build
    model, _ = load_checkpoint(path / "train-stub" / "checkpoint")
    out = tmp_path_factory.mktemp("compiled")
    desc = compiled.build(model, out, max_batch=64, shapes=[(1, 200, 16), (8, 200, 16)])
    return model, out, desc
