"""The compiled engine behind the server, on this CPU (reference ops through Inductor; the GPU plan is
the same adapter with Triton ops and CUDA graphs, not run here): with the cache off the compiled graph
serves each candidate group; with it on, prefill + cached scoring on the same model. Both equal the
eager full forward."""

from __future__ import annotations

import shutil

import numpy as np
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
