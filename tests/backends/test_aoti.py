"""AOTInductor on the CPU: build the tiny checkpoint's ranking graph, load and run it in a fresh process
that imports only torch (the package is self-contained), and reject out-of-range shapes."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hstu_opt.backends import aoti
from hstu_opt.backends.eager import EagerRunner, example_feed, graph_module
from hstu_opt.model.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def built(tiny_build, tmp_path_factory):
    path, _ = tiny_build
    model, _ = load_checkpoint(path / "train-stub" / "checkpoint")
    out = tmp_path_factory.mktemp("aoti")
    desc = aoti.build(model, "ranking", out, max_batch=64)
    return model, out, desc


def test_package_runs_in_a_fresh_process_without_hstu_opt(built, tmp_path):
    model, out, desc = built
    rng = np.random.default_rng(5)
    feeds = [example_feed(model, "ranking", rng, *shape) for shape in [(1, 1, 1), (7, 150, 9), (64, 200, 16)]]
    code = (
        "import sys, numpy as np, torch\n"
        "assert 'hstu_opt' not in sys.modules\n"
        f"run = torch._inductor.aoti_load_package({str(out / desc['package'])!r})\n"
        "for i in range(3):\n"
        f"    feed = dict(np.load({str(tmp_path)!r} + f'/feed{{i}}.npz'))\n"
        "    feed = {k: torch.from_numpy(v) for k, v in feed.items()}\n"
        "    out = run(**feed)\n"
        "    out = out[0] if isinstance(out, (list, tuple)) else out\n"
        f"    np.save({str(tmp_path)!r} + f'/out{{i}}.npy', out.numpy())\n"
    )
    for i, feed in enumerate(feeds):
        np.savez(tmp_path / f"feed{i}.npz", **feed)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eager = EagerRunner(graph_module(model, "ranking"), "ranking")
    for i, feed in enumerate(feeds):
        got, want = np.load(tmp_path / f"out{i}.npy"), eager.run(feed)["probs"]
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_runner_rejects_out_of_range_shapes(built):
    model, out, desc = built
    runner = aoti.load(out, "ranking")
    ok = example_feed(model, "ranking", np.random.default_rng(0), 2, 10, 3)
    assert runner.run(ok)["probs"].shape == (2, ok["cand_ids"].shape[1], 2)
    too_long = example_feed(model, "ranking", np.random.default_rng(0), 2, 201, 3, exact=True)
    with pytest.raises(aoti.ShapeOutOfRange, match=r"history = 201 is outside this engine's range \[1, 200\]"):
        runner.run(too_long)
    too_many = example_feed(model, "ranking", np.random.default_rng(0), 65, 5, 3)
    with pytest.raises(aoti.ShapeOutOfRange, match=r"batch = 65"):
        runner.run(too_many)
    del ok["query_time"]
    with pytest.raises(aoti.ShapeOutOfRange, match="lacks inputs"):
        runner.run(ok)
    assert desc["limits"]["history"] == [1, 200] and desc["torch"] == torch.__version__
