"""The compiled engine behind the server, on this CPU (reference ops through Inductor; the GPU plan is
the same adapter with Triton ops and CUDA graphs, not run here): with the cache off the compiled graph
serves each candidate group; with it on, prefill + cached scoring on the same model. Both equal the
eager full forward."""

from __future__ import annotations

import shutil

import numpy as np
import torch
import pytest

from hstu_opt.serve.served_bundle import COMPILED_DIR, ServedBundle
from hstu_opt.serve.settings import ServeSettings
from tests.serve.conftest import start_server, user_body
from tests.serve.test_api import FP32_EXACT, FP32_TOL, as_array, full_forward


@pytest.mark.slow
def test_compiled_engine_serves_like_eager(tiny_build, tiny_compiled, tmp_path):
    model, engine_dir, _ = tiny_compiled
    served = tmp_path / "bundle"
    shutil.copytree(tiny_build[0], served)
    (served / COMPILED_DIR).symlink_to(engine_dir, target_is_directory=True)
    bundle = ServedBundle.open(served)
    tasks = list(bundle.cfg.ranking_tasks)
    rng = np.random.default_rng(30)
    bodies = [user_body(rng, bundle.cfg.num_items, n, 2 * bundle.cfg.max_targets + 7, user_id=f"c{n}") for n in (7, 120)]
    for cache_gb, statuses in ((0, ["off", "off"]), (1, ["miss", "hit"])):
        s = start_server(ServeSettings(served, engine="compiled", cache_gb=cache_gb))
        try:
            with s.client(timeout=300) as c:  # (a CPU compile, should one happen, takes tens of seconds)
                for body in bodies:
                    first, again = c.post("/v1/rank", json=body).json(), c.post("/v1/rank", json=body).json()
                    assert first["model"]["engine"] == "compiled" and [first["cache"], again["cache"]] == statuses
                    got = as_array(first, body["candidates"], tasks)
                    np.testing.assert_allclose(got, full_forward(model, bundle, body), **FP32_TOL)
                    np.testing.assert_allclose(as_array(again, body["candidates"], tasks), got, atol=FP32_EXACT, rtol=0)
        finally:
            s.stop()


def test_fill_padded_writes_what_padded_builds(bundle_path):
    """fill_padded (the compiled adapter's zero-copy input) writes into given arrays exactly the batch padded()
    builds, over arrays holding junk from an earlier request, for users of different lengths."""
    from hstu_opt.serve.engines import fill_padded, padded
    from hstu_opt.serve.requests import rank_input
    from hstu_opt.serve.schemas import RankRequest

    bundle = ServedBundle.open(bundle_path)
    rng = np.random.default_rng(31)
    users = [rank_input(RankRequest.model_validate(user_body(rng, bundle.cfg.num_items, n, m)), bundle.limits)
             for n, m in ((5, 3), (40, 16), (1, 1))]
    cands = [u.candidates for u in users]
    want = padded(users, cands, bundle.cfg.contextual_len, 64, 16).ranking_feed()
    views = {name: rng.integers(1, 99, a.shape) for name, a in want.items()}  # junk where padding goes
    got = fill_padded(views, users, cands)
    assert got is views and set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.slow
def test_compiled_adapter_feeds_the_runner_in_place(tiny_build, tiny_compiled, tmp_path):
    """The compiled adapter writes each batch into the runner's staging buffer (run() stages nothing), with
    the very probabilities of a separately built feed."""
    from hstu_opt.serve.engines import CompiledAdapter, Row, padded, split_padded
    from hstu_opt.serve.requests import rank_input
    from hstu_opt.serve.schemas import RankRequest

    served = tmp_path / "bundle"
    shutil.copytree(tiny_build[0], served)
    (served / COMPILED_DIR).symlink_to(tiny_compiled[1], target_is_directory=True)
    bundle = ServedBundle.open(served)
    adapter = CompiledAdapter(bundle)
    rng = np.random.default_rng(32)
    T = bundle.cfg.max_targets
    users = [rank_input(RankRequest.model_validate(user_body(rng, bundle.cfg.num_items, n, T)), bundle.limits)
             for n in (9, 77)]
    rows = [Row(u, u.candidates) for u in users]
    before = adapter.runner.stats["in_place"]
    fn, grad_modes = adapter.runner.fn, []
    adapter.runner.fn = lambda *a: (grad_modes.append(torch.is_grad_enabled()), fn(*a))[1]
    got = adapter.rank_full(rows)
    assert grad_modes == [False]  # run() serves under no_grad (no autograd graph kept per request)
    assert adapter.runner.stats["in_place"] == before + 1
    key = adapter.runner.graph_key(len(rows), *adapter.widths, sum(len(u.item_ids) for u in users),
                                   sum(len(u.candidates) for u in users))
    assert key in adapter.runner._seen  # the key run() used: what the inline rule asks the runner about
    assert not adapter.replays(rows)  # (no CUDA graphs on a CPU: a lone request goes through the worker)
    feed = padded(users, [u.candidates for u in users], bundle.cfg.contextual_len, *adapter.widths).ranking_feed()
    want = split_padded(adapter.runner.run(feed)["probs"], [T, T])
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
