"""`hstu-opt serve --runner vllm` against `--runner native`: two live servers (the real CLI, real uvicorn,
127.0.0.1, a free port each) over the serve tests' bundle (conftest.bundle_path), in subprocesses: in the
process it runs in, vLLM's CPU worker turns torch.set_num_threads into a no-op, seeds the global RNGs and sets
a NUMA memory policy; that process must not be pytest's.

`make install` installs the vllm extra, so a missing vllm is a failure here, not a skip.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")

STARTUP_S = 180  # the tiny bundle's vLLM engine starts in about 10 s on 2 idle cores
TOL = 1e-5  # fp32, the same checkpoint: only the summation order differs between the runners
SERVING = re.compile(r"serving on (http://\S+)")
REPO = Path(__file__).resolve().parents[2]  # `python -m hstu_opt` imports from the working directory first


@pytest.fixture(scope="module", autouse=True)
def _needs_vllm():
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not importable: `make install` installs the vllm extra (pip install -e '.[vllm]')")


class Served:
    """One `hstu-opt serve` process; stop() sends SIGTERM (graceful drain) and waits."""

    def __init__(self, bundle: Path, *args: str):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "hstu_opt", "serve", str(bundle), "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url: str | None = None
        self._found = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())
            if (m := SERVING.search(line)) and self.url is None:
                self.url = m.group(1)
                self._found.set()
        self._found.set()  # the process ended

    def wait_ready(self) -> "Served":
        self._found.wait(STARTUP_S)
        assert self.url, "server did not start:\n" + "\n".join(self.lines[-40:])
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def servers(bundle_path):
    """(vllm, native) over the same bundle; both start at once."""
    vllm = Served(bundle_path, "--runner", "vllm", "--max-batch", "8")
    native = Served(bundle_path, "--runner", "native")
    try:
        yield vllm.wait_ready(), native.wait_ready()
    finally:
        codes = (vllm.stop(), native.stop())
    assert codes == (0, 0), f"servers exited {codes}:\n" + "\n".join(vllm.lines[-20:])


@pytest.fixture(scope="module")
def limits(servers) -> dict:
    with servers[1].client() as c:
        return c.get("/v1/model").json()["limits"]


def body(rng: np.random.Generator, limits: dict, n_hist: int, n_cand: int, ratings: bool = True) -> dict:
    ts = np.sort(rng.integers(1_000_000_000, 1_100_000_000, n_hist))
    return {"user_id": None,
            "history": {"item_ids": rng.integers(1, limits["num_items"] + 1, n_hist).tolist(),
                        "ratings": rng.integers(1, 6, n_hist).tolist() if ratings else None,
                        "timestamps": ts.tolist()},
            "candidates": rng.integers(1, limits["num_items"] + 1, n_cand).tolist(),  # repeats allowed
            "query_time": int(ts[-1]) + int(rng.integers(0, 86400))}


def probs(resp: httpx.Response, candidates: list[int]) -> np.ndarray:
    """[M, T] in the request's candidate order (results come sorted by score; duplicates score alike)."""
    assert resp.status_code == 200, resp.text
    by_item = {r["item_id"]: list(r["scores"].values()) for r in resp.json()["results"]}
    return np.array([by_item[c] for c in candidates], np.float64)


def rank(client: httpx.Client, b: dict) -> np.ndarray:
    return probs(client.post("/v1/rank", json=b), b["candidates"])


def test_model_reports_the_vllm_runner(servers):
    with servers[0].client() as c:
        runner = c.get("/v1/model").json()["runner"]
        assert c.get("/readyz").status_code == 200
    assert runner["runner"] == "vllm" and runner["engine"] == "vllm"
    assert runner["cache"]["enabled"] is False and "softmax" in runner["cache"]["why"]
    assert runner["vllm"] == "0.32.0"


def test_rank_equals_native(servers, limits):
    """History lengths from 1 to past max_history_len (truncated alike), candidates from 1 to past
    max_targets (the native runner scores groups of max_targets; vLLM gets one sequence per group)."""
    rng = np.random.default_rng(0)
    H, M = limits["max_history_len"], limits["max_targets"]
    shapes = [(1, 1, True), (7, 3, False), (H // 2, M, True), (H, M + 1, True), (H + 30, 2 * M + 5, True)]
    with servers[0].client() as v, servers[1].client() as n:
        for n_hist, n_cand, ratings in shapes:
            b = body(rng, limits, n_hist, n_cand, ratings)
            got = v.post("/v1/rank", json=b)
            assert got.json()["cache"] == "off" and got.json()["model"]["engine"] == "vllm"
            assert got.json()["truncated"] == (n_hist > H)
            np.testing.assert_allclose(probs(got, b["candidates"]), rank(n, b), rtol=0, atol=TOL,
                                       err_msg=f"history {n_hist}, candidates {n_cand}")


def test_columns_layout_through_vllm(servers, limits):
    """results_layout is applied by the route after the runner: the vLLM runner's columns hold its items'
    ids and scores."""
    b = body(np.random.default_rng(3), limits, 20, limits["max_targets"] + 2)
    with servers[0].client() as v:
        items = v.post("/v1/rank", json=b)
        columns = v.post("/v1/rank", json=b | {"results_layout": "columns"})
    assert columns.status_code == 200, columns.text
    cols = columns.json()["columns"]
    by_item = dict(zip(cols["item_id"], zip(*cols["scores"].values())))
    np.testing.assert_allclose([by_item[c] for c in b["candidates"]], probs(items, b["candidates"]), rtol=0, atol=TOL)


def test_retrieve_equals_native(servers, limits):
    rng = np.random.default_rng(1)
    with servers[0].client() as v, servers[1].client() as n:
        for n_hist in (1, 40):
            b = {**body(rng, limits, n_hist, 1), "k": 20, "exclude_seen": True}
            del b["candidates"]
            got, want = v.post("/v1/retrieve", json=b).json(), n.post("/v1/retrieve", json=b).json()
            np.testing.assert_allclose([r["score"] for r in got["results"]], [r["score"] for r in want["results"]],
                                       rtol=0, atol=TOL)


def test_concurrent_requests_all_succeed_and_batch(servers, limits):
    """48 requests from 12 threads: every one answers 200 with the scores it gets alone (HSTU's fixed
    1/N scale makes a sequence's scores independent of its batch), and vLLM's scheduler put several
    sequences in one step (fewer steps than sequences)."""
    rng = np.random.default_rng(2)
    bodies = [body(rng, limits, int(rng.integers(1, limits["max_history_len"] + 1)), int(rng.integers(1, 40)))
              for _ in range(48)]
    vllm = servers[0]
    with vllm.client() as c:
        alone = [rank(c, b) for b in bodies[:6]]
        before = c.get("/v1/model").json()["runner"]["batching"]

        def post(b: dict) -> httpx.Response:
            with vllm.client() as cc:
                return cc.post("/v1/rank", json=b)

        t0 = time.monotonic()
        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(post, bodies))
        elapsed = time.monotonic() - t0
        after = c.get("/v1/model").json()["runner"]["batching"]
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text for r in responses if r.status_code != 200]
    for b, r, a in zip(bodies, responses, alone):
        np.testing.assert_allclose(probs(r, b["candidates"]), a, rtol=0, atol=TOL)
    assert after["steps"] - before["steps"] < sum(-(-len(b["candidates"]) // limits["max_targets"]) for b in bodies)
    assert elapsed < 120


def test_vllm_runner_rejects_other_engines(bundle_path):
    out = subprocess.run([sys.executable, "-m", "hstu_opt", "serve", str(bundle_path), "--runner", "vllm",
                          "--engine", "onnxruntime", "--port", "0"], capture_output=True, text=True, timeout=120,
                         cwd=REPO)
    assert out.returncode == 2
    assert "--engine onnxruntime with --runner vllm" in out.stdout + out.stderr
