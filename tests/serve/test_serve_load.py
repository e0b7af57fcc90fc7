"""benchmarks/serve_load.py end to end, bounded small: it serves, loads, stops the server and writes JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serve_load_script_small_run(bundle_path, tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--bundle", str(bundle_path), "--requests", "60",
           "--concurrency", "1,4", "--users", "8", "--engine-repeats", "3", "--torch-threads", "1", "--client-procs", "2", "--arrays", "binary",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("serve_load_*.json")
    report = json.loads(result.read_text())
    assert [r["concurrency"] for r in report["rows"]] == [1, 4]
    assert [r["client_procs"] for r in report["rows"]] == [1, 2]  # (4 concurrent requests from 2 processes, merged)
    assert all(r["requests"] == 60 and r["errors"] == 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in report["rows"])
    assert report["server_exit_code"] == 0 and report["versions"]["fastapi"] and report["machine"]["cores"]
    assert sum(r["cache_hits"] for r in report["rows"]) > 0  # 8 users, 120 requests: repeats hit the cache
    for r in report["rows"]:  # hits and misses timed apart, every request in one of them
        assert sum(b["n"] for b in r["by_cache"].values()) == r["requests"] and set(r["by_cache"]) <= {"hit", "miss"}
        assert r["by_cache"]["hit"]["n"] == r["cache_hits"] and r["by_cache"]["hit"]["server_p50_ms"] > 0
    assert {e["batch"] for e in report["engine_alone"]} == {1, 4}
    assert [e["batch"] for e in report["engine_alone"] if e.get("gap_ms") == 2.0] == [1]  # batch 1 with idle gaps too
