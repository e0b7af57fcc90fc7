"""Live servers for the serve tests: real uvicorn on 127.0.0.1 (a free port), real engines from the tiny
bundle (the session's `tiny_build`, or a prebuilt one named by HSTU_OPT_TEST_BUNDLE while iterating)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest

from hstu_opt.serve.runners.base import Runner
from hstu_opt.serve.settings import ServeSettings


@dataclass
class LiveServer:
    url: str
    runner: Runner
    server: object  # hstu_opt.serve.server.Server (uvicorn's, imported only when a test serves)
    thread: threading.Thread
    lines: list[str]

    def client(self, **kw):
        import httpx

        return httpx.Client(base_url=self.url, **{"timeout": 60, **kw})

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the server did not stop"


def start_server(settings: ServeSettings) -> LiveServer:
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from hstu_opt.serve import server

    lines: list[str] = []
    app, runner = server.build(replace(settings, port=0), lines.append)
    sock = server.listen("127.0.0.1", 0)
    srv = server.Server(server.uvicorn_config(app, settings), sock, lines.append, runner)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"server did not start: {lines}"
        time.sleep(0.02)
    return LiveServer(server.url_of(sock), runner, srv, thread, lines)


@pytest.fixture(scope="session")
def bundle_path(request) -> Path:
    prebuilt = os.environ.get("HSTU_OPT_TEST_BUNDLE")
    return Path(prebuilt) if prebuilt else request.getfixturevalue("tiny_build")[0]


@pytest.fixture(scope="module")
def live(bundle_path):
    """The default server: auto engine (eager on this CPU, as the cache is on)."""
    s = start_server(ServeSettings(bundle_path))
    yield s
    s.stop()


def user_body(rng: np.random.Generator, num_items: int, n_hist: int, n_cand: int, user_id: str | None = "u") -> dict:
    ts = np.sort(rng.integers(1_000_000_000, 1_100_000_000, n_hist))
    return {"user_id": user_id,
            "history": {"item_ids": rng.integers(1, num_items + 1, n_hist).tolist(),
                        "ratings": rng.integers(1, 6, n_hist).tolist(), "timestamps": ts.tolist()},
            "candidates": (rng.choice(num_items, n_cand, replace=False) + 1).tolist(),  # distinct ids
            "query_time": int(ts[-1]) + int(rng.integers(0, 86400))}
