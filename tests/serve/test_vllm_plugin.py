"""The vLLM plugin's parts that need no engine: the entry points vLLM discovers, and the rows one HSTU
sequence carries through a vLLM request (prompt token ids + PoolingParams.extra_kwargs)."""

from __future__ import annotations

from importlib.metadata import entry_points

import numpy as np

from hstu_opt.serve.runners import vllm_plugin
from hstu_opt.serve.runners.vllm_plugin.rows import SeqRows


def test_entry_points_are_installed_and_resolve():
    general = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    io = {e.name: e for e in entry_points(group="vllm.io_processor_plugins")}
    assert general["hstu_opt"].load() is vllm_plugin.register
    assert io[vllm_plugin.IO_PROCESSOR].load()() == "hstu_opt.serve.runners.vllm_plugin.io_processor.HstuIOProcessor"


def test_rows_put_contextual_history_candidates_in_order_and_round_trip():
    ctx, ids, ratings, ts = np.array([7, 8]), np.array([3, 4, 5]), np.array([1, 0, 5]), np.array([10, 20, 30])
    rows = SeqRows.build(ctx, ids, ratings, ts, candidates=np.array([9, 2]), query_time=99)
    assert rows.token_ids() == [7, 8, 3, 4, 5, 9, 2]
    assert rows.ratings.tolist() == [0, 0, 1, 0, 5, 0, 0]
    assert rows.timestamps.tolist() == [99, 99, 10, 20, 30, 99, 99]  # contextual and candidate rows: query time
    assert rows.num_targets == 2
    back = SeqRows.from_request(np.array(rows.token_ids(), np.int32), rows.extra_kwargs())
    for name in ("ids", "ratings", "timestamps"):
        assert np.array_equal(getattr(back, name), getattr(rows, name)) and getattr(back, name).dtype == np.int64
    assert (back.num_targets, back.query_time) == (2, 99)


def test_rows_without_contextual_or_candidates_and_vllm_warm_up_requests():
    rows = SeqRows.build(None, np.array([1]), np.array([0]), np.array([5]), np.zeros(0, np.int64), 5)
    assert rows.token_ids() == [1] and rows.num_targets == 0  # retrieval
    assert SeqRows.from_request([0, 0, 0], None) is None  # vLLM's own dummy pooling requests carry no rows
