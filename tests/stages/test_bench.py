import json


def test_bench_outputs(tiny_build):
    path, results = tiny_build
    bench = json.loads((path / "bench" / "bench.json").read_text())
    assert {"rows", "machine", "skipped", "threads"} <= set(bench)
    assert {"cpu", "cores", "date_utc", "toolchain"} <= set(bench["machine"])
    backends = {r["backend"] for r in bench["rows"]}
    assert backends == {"eager", "onnxruntime.fp32", "onnxruntime.int8"}
    grid = {(r["batch"], r["history"], r["candidates"]) for r in bench["rows"]}
    assert grid == {(1, 200, 16), (8, 200, 16), (32, 200, 16)}
    for r in bench["rows"]:
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["users_per_s"] > 0 and r["repeats"] == 20
    assert set(bench["skipped"]) >= {"tensorrt.ranking.fp32", "tensorrt.ranking.int8"}
    md = (path / "bench" / "bench.md").read_text()
    assert "| onnxruntime.fp32 | 32 | 200 | 16 |" in md
    for png in results["bench"].record["plots"]:
        assert (path / "bench" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_outside_the_exported_limits_is_a_clear_error():
    import pytest

    from hstu_opt.errors import StageError
    from hstu_opt.stages.bench import check_grid

    limits = {"batch": [1, 256], "history": [1, 200], "candidates": [1, 16]}
    check_grid([(32, 200, 16)], limits)
    with pytest.raises(StageError, match=r"bench.history_lengths has \[500\], outside .* \[1, 200\]"):
        check_grid([(32, 500, 16)], limits)
