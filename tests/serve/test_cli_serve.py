"""`hstu-opt serve` as a process: graceful shutdown with requests in flight, and one-line CLI errors."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from hstu_opt.serve.served_bundle import ServedBundle
from tests.serve.conftest import user_body

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed")
ROOT = Path(__file__).resolve().parents[2]
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
SERVE = [sys.executable, "-m", "hstu_opt", "serve"]


def run_cli(*args, code: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", code, *map(str, args)] if code else [*SERVE, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def wait_for_url(proc: subprocess.Popen, timeout_s: float = 180) -> str:
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        if m := re.search(r"serving on (http://\S+)", line):
            return m.group(1)
        assert time.monotonic() < deadline, "no 'serving on' line"
    raise AssertionError(f"server exited ({proc.wait()}): {proc.stderr.read()}")


def in_progress(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return int(float(re.search(r"^hstu_serve_requests_in_progress (\S+)$", text, re.M).group(1)))


def test_sigterm_finishes_requests_in_flight_and_exits_0(bundle_path):
    """Requests are in flight when SIGTERM arrives (queued for a batch that cannot fill before the long
    max wait): the drain runs them at once, each completes with 200 after the signal, the process says it
    is stopping and exits 0."""
    bundle = ServedBundle.open(bundle_path)
    n_requests = 6
    proc = subprocess.Popen([*SERVE, bundle_path, "--port", "0", "--max-batch", str(n_requests + 1),
                             "--max-wait-ms", "600000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, cwd=ROOT)
    try:
        url = wait_for_url(proc)
        rng = np.random.default_rng(20)
        bodies = [user_body(rng, bundle.cfg.num_items, 30, 3 * bundle.cfg.max_targets, user_id=f"s{i}")
                  for i in range(n_requests)]

        def post(body):
            r = httpx.post(f"{url}/v1/rank", json=body, timeout=120)
            return r.status_code, time.monotonic()

        with ThreadPoolExecutor(n_requests) as pool:
            futures = [pool.submit(post, b) for b in bodies]
            while in_progress(url) < n_requests + 1:  # (+1: this scrape)
                time.sleep(0.01)
            assert not any(f.done() for f in futures)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            done = [f.result() for f in futures]
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [status for status, _ in done] == [200] * n_requests
    assert min(t for _, t in done) > signalled  # all were still queued at the signal; the drain ran them
    assert proc.returncode == 0, err
    assert "stopping" in out and out.rstrip().endswith("stopped")


def test_cli_errors_are_one_line_exit_2(bundle_path, tmp_path):
    assert "no manifest.json" in one_line_error(run_cli(tmp_path / "nowhere"))
    assert "--engine 'turbo'" in one_line_error(run_cli(bundle_path, "--engine", "turbo"))
    assert "--loop 'tokio': choose one of auto, asyncio, uvloop" in one_line_error(run_cli(bundle_path, "--loop", "tokio"))
    line = one_line_error(run_cli(bundle_path, "--engine", "compiled"))
    assert "no compiled engine" in line and "onnxruntime.fp32" in line
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in one_line_error(run_cli(bundle_path, "--port", port))


def test_missing_serve_extra_names_it(bundle_path):
    code = ("import sys; sys.modules['fastapi'] = None; sys.argv = ['hstu-opt', 'serve', *sys.argv[1:]]; "
            "from hstu_opt.cli import main; main()")
    assert "pip install 'hstu-opt[serve]'" in one_line_error(run_cli(bundle_path, code=code))


def test_importing_hstu_opt_does_not_import_fastapi():
    code = ("import sys; from hstu_opt import cli; cli._register_stage_commands(); "
            "import hstu_opt.serve.requests, hstu_opt.serve.runners.base, hstu_opt.serve.kv_cache; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette') if m in sys.modules))")
    proc = run_cli(code=code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
