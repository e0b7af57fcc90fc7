"""The `compiled` engine on the CPU (reference ops, Inductor C++): the padded -> jagged request
conversion, the serving graph (last layer for candidates only), cold compile and warm start each in a
fresh process with empty caches, outputs against eager, and out-of-range requests rejected."""

import json

import numpy as np
import pytest
import torch

from hstu_opt.backends import compiled
from hstu_opt.backends.eager import EagerRunner, ShapeOutOfRange, example_feed, graph_module
from hstu_opt.model.scoring import to_tensors
from tests.model.helpers import jagged_from_padded, random_requests, tiny_model


def _valid(feed):
    return np.arange(feed["cand_ids"].shape[1])[None] < feed["num_candidates"][:, None]


@pytest.mark.parametrize("C,window", [(0, 0), (2, 0), (2, 5)])
def test_rank_jagged_equals_padded_rank_on_real_slots(C, window):
    """Eager, no compile: the jagged serving graph (built from the padded feed by the runner's own
    conversion) gives the padded contract's probabilities, contextual rows and windows included."""
    model = tiny_model(C=C, window=window)
    feed = random_requests(5, C, np.random.default_rng(C + window)).ranking_feed()
    rows, cand_mask = compiled.jagged_feed(feed, C)
    got = model.rank_jagged(**to_tensors(rows))
    want = model.rank(**to_tensors(feed))
    assert cand_mask.sum() == got.shape[0] == len(rows["target_rows"])
    torch.testing.assert_close(got, want[torch.from_numpy(cand_mask)], atol=1e-5, rtol=1e-4)
    assert len(rows["history_rows"]) == C * 5 + feed["hist_lengths"].sum()


@pytest.mark.parametrize("C", [0, 3])
def test_jagged_feed_rows(C):
    """The conversion equals the test helpers' own padded -> jagged construction; the target and history
    row lists partition the rows; writing into a caller's (larger, dirty) buffer gives the same rows."""
    batch = random_requests(7, C, np.random.default_rng(11 + C))
    batch.num_candidates[2] = 0  # a user with no candidates
    feed = batch.ranking_feed()
    rows, cand_mask = compiled.jagged_feed(feed, C)
    ids, ratings, ts, offsets, nt, qt = (t.numpy() for t in jagged_from_padded(batch, C))
    for name, want in (("ids", ids), ("ratings", ratings), ("timestamps", ts), ("offsets", offsets),
                       ("num_targets", nt), ("query_time", qt)):
        np.testing.assert_array_equal(rows[name], want, err_msg=name)
    is_target = np.zeros(len(ids), bool)
    is_target[rows["target_rows"]] = True
    np.testing.assert_array_equal(np.sort(np.r_[rows["target_rows"], rows["history_rows"]]), np.arange(len(ids)))
    assert is_target.sum() == cand_mask.sum() == nt.sum()
    for b in range(7):  # each user's targets are its last num_candidates rows
        assert is_target[offsets[b]:offsets[b + 1]].tolist() == [False] * (offsets[b + 1] - offsets[b] - nt[b]) + [True] * nt[b]
    buffer = np.full(10_000, -7, np.int64)
    again, _ = compiled.jagged_feed(feed, C, buffer)
    for name in compiled.JAGGED_INPUTS:
        np.testing.assert_array_equal(again[name], rows[name], err_msg=name)
        assert np.shares_memory(again[name], buffer)


@pytest.mark.parametrize("C,window", [(0, 0), (2, 5)])
def test_the_padding_user_changes_no_score(C, window):
    """Rows bucketed as the runner keys them (serve_padded: the real rows, then a padding user up to the
    bucket) give the same probabilities as the unpadded rows (fp32, 1e-6), at bucket steps that leave the
    padding user its minimum and more; and through serve_padded itself, the padded contract's."""
    model = tiny_model(C=C, window=window)
    feed = random_requests(5, C, np.random.default_rng(7 + C)).ranking_feed()
    rows, cand_mask = compiled.jagged_feed(feed, C)
    want = model.rank_jagged(**to_tensors(rows))
    real, N = len(rows["ids"]), model.cfg.max_seq_len
    for L in (real + max(1, C), compiled.bucket_rows(real, C, N, step=16), compiled.bucket_rows(real, C, N)):
        assert L - real <= N
        padded_rows, _ = compiled.jagged_feed(feed, C, rows_to=L)
        torch.testing.assert_close(model.rank_jagged(**to_tensors(padded_rows)), want, atol=1e-6, rtol=1e-6)
    buffer = np.zeros(50_000, np.int64)
    n = compiled.stage_feed(feed, C, buffer)
    (B, Nh), Nc = feed["hist_ids"].shape, feed["cand_ids"].shape[1]
    T = int(feed["num_candidates"].sum())
    with torch.no_grad():
        served = compiled.serve_padded(model, torch.from_numpy(buffer[:n]), B, Nh, Nc, C,
                                       compiled.bucket_rows(real, C, N), T)
    torch.testing.assert_close(served[torch.from_numpy(cand_mask)], want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("C", [0, 3])
def test_pack_jagged_equals_jagged_feed(C):
    """The runner's device-side conversion (stage_feed on the host, then pack_jagged, here on the CPU)
    gives jagged_feed's rows exactly, the padding user up to the row bucket included, and each target
    row's padded slot; users with no candidates and (C=0) users with no rows at all, staged into a dirty
    buffer."""
    batch = random_requests(7, C, np.random.default_rng(21 + C))
    batch.num_candidates[2] = 0
    if C == 0:
        batch.hist_lengths[4], batch.num_candidates[4] = 0, 0
    feed = batch.ranking_feed()
    real = len(compiled.jagged_feed(feed, C)[0]["ids"])
    L = compiled.bucket_rows(real, C, 10**6, step=64)
    assert L % 64 == 0 and L - real >= max(1, C)
    assert compiled.bucket_rows(real, C, 40) - real <= 40  # (the step shrinks so the padding user fits max_seq_len)
    assert compiled.bucket_rows(real, C, 10**6, most=real) == real + max(1, C)  # full width: the least padding
    rows, cand_mask = compiled.jagged_feed(feed, C, rows_to=L)
    buffer = np.full(50_000, -7, np.int64)
    n = compiled.stage_feed(feed, C, buffer)
    (B, Nh), Nc = feed["hist_ids"].shape, feed["cand_ids"].shape[1]
    T = int(feed["num_candidates"].sum())
    got, slots = compiled.pack_jagged(torch.from_numpy(buffer[:n]), B, Nh, Nc, C, L, T)
    assert len(got["offsets"]) == B + 2 and int(got["offsets"][-2]) == real and int(got["offsets"][-1]) == L
    for name in compiled.JAGGED_INPUTS:
        np.testing.assert_array_equal(got[name].numpy(), rows[name], err_msg=name)
    np.testing.assert_array_equal(slots.numpy(), np.flatnonzero(cand_mask.reshape(-1)))
    if C:  # as the engine runs it: through Inductor (its bucketize lowering wants buffers as boundaries)
        traced, traced_slots = torch.compile(compiled.pack_jagged)(torch.from_numpy(buffer[:n]), B, Nh, Nc, C,
                                                                   len(rows["ids"]), T)
        for name in compiled.JAGGED_INPUTS:
            np.testing.assert_array_equal(traced[name].numpy(), rows[name], err_msg=name)
        np.testing.assert_array_equal(traced_slots.numpy(), slots.numpy())


@pytest.fixture(scope="module")
def built(tiny_compiled):
    return tiny_compiled  # (tests/conftest.py: shared with tests/serve)


def test_warm_start_uses_only_the_shipped_artifacts(built):
    _, out, desc = built
    cold, warm = desc["cold_start"], desc["warm_start"]
    assert cold["inductor_cache"].get("fxgraph_cache_miss", 0) >= 1 and not cold["inductor_cache"].get("fxgraph_cache_hit")
    assert warm["inductor_cache"].get("fxgraph_cache_hit", 0) >= 1 and not warm["inductor_cache"].get("fxgraph_cache_miss")
    assert warm["max_abs_diff_vs_cold"] == 0.0
    meta = json.loads((out / compiled.META).read_text())
    assert meta["device"] == "cpu" and meta["impl"] == "reference" and meta["torch"] == torch.__version__
    assert (out / compiled.CACHE).stat().st_size == desc["bytes"] > 0


def test_runner_matches_eager_and_rejects_out_of_range(built):
    model, out, _ = built
    runner = compiled.load(out)
    eager = EagerRunner(graph_module(model, "ranking"), "ranking")
    rng = np.random.default_rng(11)
    for shape in [(3, 150, 9), (1, 1, 1), (8, 200, 16)]:  # (3, 150, 9): ragged, not a warmed shape
        feed = example_feed(model, "ranking", rng, *shape)
        got, want = runner.run(feed)["probs"], eager.run(feed)["probs"]
        m = _valid(feed)
        assert got.shape == want.shape and (got[~m] == 0).all()
        np.testing.assert_allclose(got[m], want[m], atol=1e-5, rtol=1e-4)
    assert set(runner.phase_s) == {"prepare", "launch", "wait", "scatter"} and all(t > 0 for t in runner.phase_s.values())
    # zero-copy input: the same request written into the runner's own buffers runs without staging
    feed = example_feed(model, "ranking", rng, 3, 150, 9)
    want = runner.run(feed)["probs"]
    buffers = runner.feed_buffers(*feed["hist_ids"].shape, feed["cand_ids"].shape[1])
    assert set(buffers) == set(feed)
    for name, a in buffers.items():
        a[...] = feed[name]
    before = runner.stats["in_place"]
    np.testing.assert_array_equal(runner.run(buffers)["probs"], want)
    assert runner.stats["in_place"] == before + 1
    # a run of another feed stages over those arrays: they are then an ordinary feed again (copied)
    other = example_feed(model, "ranking", rng, *feed["hist_ids"].shape, feed["cand_ids"].shape[1], exact=True)
    np.testing.assert_allclose(runner.run(other)["probs"], eager.run(other)["probs"], atol=1e-5, rtol=1e-4)
    runner.run(buffers)
    assert runner.stats["in_place"] == before + 1
    with pytest.raises(ShapeOutOfRange, match=r"batch = 65 is outside"):
        runner.feed_buffers(65, 10, 2)
    bad = example_feed(model, "ranking", rng, 2, 50, 3, exact=True)
    bad["hist_lengths"][1] = 51
    with pytest.raises(ShapeOutOfRange, match=r"hist_lengths must lie in \[0, 50\]"):
        runner.run(bad)
    with pytest.raises(ShapeOutOfRange, match=r"history = 201 is outside this engine's range \[1, 200\]"):
        runner.run(example_feed(model, "ranking", rng, 2, 201, 3, exact=True))
    with pytest.raises(compiled.HstuOptError, match="ranking only"):
        compiled.load(out, "retrieval")


def test_eager_layers_break_the_graph_once_and_change_nothing():
    """rank_jagged with eager_layers under torch.compile: two graphs around one break (every layer but the
    last runs outside), the same probabilities as eager and as the whole graph compiled."""
    model = tiny_model(C=2)
    feed = random_requests(5, 2, np.random.default_rng(3)).ranking_feed()
    t = to_tensors(compiled.jagged_feed(feed, 2)[0])
    want = model.rank_jagged(**t)
    model.use_eager_layers()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.rank_jagged)(**t)
    assert (explained.graph_count, explained.graph_break_count) == (2, 1)
    assert "disable" in str(explained.break_reasons[0].reason)
    torch.testing.assert_close(torch.compile(model.rank_jagged)(**t), want, atol=1e-6, rtol=1e-5)


def _entry(root, name, key):
    d = root / key
    d.mkdir(parents=True)
    (d / f"__grp__{name}.json").write_text("{}")
    (d / f"{name}.cubin").write_bytes(b"x" * 10)
    return d


def test_ship_and_install_triton_kernels(tmp_path):
    """Only hstu-opt's own kernels are shipped (Inductor's triton_* ones travel in the cache artifacts);
    installing puts them into the cache directory whole, keeps entries already there, and can run twice."""
    cold = tmp_path / "cold"
    _entry(cold, "_hstu_fwd", "AAA")
    _entry(cold, "_gemm_tma_kernel", "BBB")
    _entry(cold, "triton_poi_fused_add_0", "CCC")
    (cold / "DDD").mkdir()  # an entry without a group file (an interrupted write): skipped
    engine = tmp_path / "engine"
    engine.mkdir()
    assert compiled.ship_triton_kernels(cold, engine / compiled.TRITON_CACHE) == 2
    assert sorted(p.name for p in (engine / compiled.TRITON_CACHE).iterdir()) == ["AAA", "BBB"]
    cache = tmp_path / "cache"
    _entry(cache, "_hstu_fwd", "AAA")
    (cache / "AAA" / "_hstu_fwd.cubin").write_bytes(b"kept")
    for _ in range(2):
        assert compiled.install_triton_kernels(engine / compiled.TRITON_CACHE, cache) == 2
    assert (cache / "AAA" / "_hstu_fwd.cubin").read_bytes() == b"kept"
    assert (cache / "BBB" / "_gemm_tma_kernel.cubin").read_bytes() == b"x" * 10
    assert sorted(p.name for p in cache.iterdir()) == ["AAA", "BBB"]  # no temp dirs left behind
