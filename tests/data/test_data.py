import numpy as np
import pytest

from hstu_opt.data.metrics import auc, hr_ndcg, target_ranks
from hstu_opt.data.movielens import read_ratings
from hstu_opt.data.sequences import from_interactions, synthetic
from hstu_opt.data.splits import leave_one_out
from hstu_opt.errors import DataError
from hstu_opt.recipe import SyntheticSection

ROWS = [(1, 10, 4, 300), (1, 11, 2, 100), (2, 10, 5, 50), (1, 12, 5, 200), (2, 13, 1, 60), (2, 11, 3, 70)]


@pytest.mark.parametrize("fmt", ["inter", "udata", "dat", "csv"])
def test_each_movielens_format_gives_chronological_sequences(tmp_path, fmt):
    sep = {"inter": "\t", "udata": "\t", "dat": "::", "csv": ","}[fmt]
    header = {"inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n",
              "csv": "userId,movieId,rating,timestamp\n"}.get(fmt, "")
    path = tmp_path / f"ratings.{fmt}"
    path.write_text(header + "".join(sep.join(map(str, r)) + "\n" for r in ROWS))
    seqs = from_interactions(read_ratings(path, fmt), min_len=3, contextual_len=0)
    assert seqs.num_users == 2 and seqs.num_items == 4
    # user 1 in time order: items 11 (t=100), 12 (t=200), 10 (t=300) -> remapped ids 2, 3, 1
    assert seqs.items[0].tolist() == [2, 3, 1]
    assert seqs.ratings[0].tolist() == [2, 5, 4]
    assert seqs.timestamps[0].tolist() == [100, 200, 300]


def test_bad_file_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_ratings(tmp_path / "nope.dat", "dat")
    bad = tmp_path / "bad.inter"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(DataError, match="bad.inter"):
        read_ratings(bad, "inter")


def test_synthetic_is_deterministic_and_long():
    cfg = SyntheticSection(num_users=30, num_items=500, min_len=100, max_len=3000)
    a, b = synthetic(cfg, 2, seed=3), synthetic(cfg, 2, seed=3)
    assert a.fingerprint == b.fingerprint
    assert all((x == y).all() for x, y in zip(a.items, b.items))
    lengths = [len(s) for s in a.items]
    assert min(lengths) >= 100 and max(lengths) > 1000 and max(lengths) <= 3000
    assert all((np.diff(t) >= 0).all() for t in a.timestamps)
    assert a.contextual.shape == (30, 2)


def test_leave_one_out_holds_out_last_and_second_to_last():
    seqs = synthetic(SyntheticSection(num_users=5, num_items=50, min_len=6, max_len=9), 0, seed=0)
    test = leave_one_out(seqs, "test", max_history=100, num_negatives=3, tasks=("watched", "liked"), seed=0)
    val = leave_one_out(seqs, "val", max_history=100, num_negatives=3, tasks=("watched", "liked"), seed=0)
    _, batch = next(test.batches(10))
    for i, u in enumerate(test.users):
        assert test.targets[i] == seqs.items[u][-1] and val.targets[i] == seqs.items[u][-2]
        assert batch.hist_lengths[i] == len(seqs.items[u]) - 1
        assert batch.query_time[i] == seqs.timestamps[u][-1]
    assert (test.labels[:, 0, 0] == 1).all() and (test.labels[:, 1:, 0] == 0).all()


def test_metrics():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    ranks = target_ranks(scores, np.array([3, 1]))  # item 3 is 2nd for user 0; item 1 is 3rd for user 1
    assert ranks.tolist() == [1, 2]
    hr, ndcg = hr_ndcg(ranks, k=2)
    assert hr == 0.5 and ndcg == pytest.approx(0.5 / np.log2(3))
    assert auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.1, 0.8, 0.2])) == 1.0
    assert auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
