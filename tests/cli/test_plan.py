"""hstu-opt plan: stages, cache state and keys without running anything; --target / --precision."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hstu_opt import pipeline
from hstu_opt.errors import RecipeError
from hstu_opt.recipe import load_recipe
from hstu_opt.stages import STAGES
from hstu_opt.targets import for_target

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny.yaml"


def plan(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hstu_opt", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_plan_on_a_fresh_out_dir_has_every_stage_uncached(tmp_path):
    report = json.loads(plan(TINY, "--out", tmp_path / "out", "--json").stdout)
    assert [s["stage"] for s in report["stages"]] == [s.name for s in STAGES]
    assert not any(s["cached"] for s in report["stages"])
    first, *rest = report["stages"]
    assert re.fullmatch(r"[0-9a-f]{64}", first["key"])  # train-stub has no upstream stage: its key is known
    assert [s["note"] for s in rest] == [  # each waits for the last of its inputs
        "unknown until train-stub runs", "unknown until export-onnx runs", "unknown until export-onnx runs",
        "unknown until calibrate-int8 runs", "unknown until build-engine runs"]
    assert all(s["key"] is None for s in rest)
    assert report["recipe_sha256"] == load_recipe(TINY).digest()
    assert report["ci_cache"]["key"].startswith(report["ci_cache"]["restore_prefix"])
    assert not (tmp_path / "out").exists()  # plan writes nothing
    table = plan(TINY, "--out", tmp_path / "out").stdout
    assert "0/6 stages cached" in table and "unknown until" in table and report["ci_cache"]["key"] in table


def test_plan_after_a_build_has_every_stage_cached_under_the_build_keys(tiny_build):
    bundle, results = tiny_build
    report = json.loads(plan(TINY, "--out", bundle.parent.parent, "--json").stdout)
    assert all(s["cached"] for s in report["stages"]), report["stages"]
    assert {s["stage"]: s["key"] for s in report["stages"]} == {name: r.key for name, r in results.items()}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {s["stage"]: s["key"] for s in report["stages"]} == {n: s["key"] for n, s in manifest["stages"].items()}
    assert "6/6 stages cached" in plan(TINY, "--out", bundle.parent.parent).stdout


def test_env_file_gets_what_a_pipeline_reads(tmp_path):
    env_file = tmp_path / "plan.env"
    env_file.write_text("earlier=kept\n")  # $GITHUB_OUTPUT is appended to, never replaced
    plan(TINY, "--out", "artifacts", "--target", "cpu", "--precision", "float", "--env-file", env_file)
    lines = dict(ln.split("=", 1) for ln in env_file.read_text().splitlines())
    assert lines["earlier"] == "kept"
    assert lines["bundle"] == "artifacts/tiny/1" and lines["artifact"] == "tiny-1-cpu-float"
    assert lines["cache_key"].startswith(lines["cache_prefix"]) and lines["cache_prefix"] == "hstu-opt-tiny-1-"


def test_targets_and_precisions_override_only_engine_and_quantize():
    recipe = load_recipe(TINY)
    cpu = for_target(recipe, "cpu", "float")
    assert cpu.engine.backends == ("onnxruntime",) and not cpu.quantize.enabled
    sm89 = for_target(recipe, "sm89", "int8")
    assert sm89.engine.backends == ("tensorrt",) and sm89.engine.tensorrt_target_cc == "8.9" and sm89.quantize.enabled
    assert for_target(recipe, None, None) == recipe
    for other in (cpu, sm89):
        assert other.model == recipe.model and other.train == recipe.train  # training is shared: same key
    keys = {pipeline.ci_cache_key(r) for r in (recipe, cpu, sm89, for_target(recipe, "cpu", "int8"))}
    assert len(keys) == 4 and pipeline.ci_cache_key(cpu) == pipeline.ci_cache_key(for_target(recipe, "cpu", "float"))


@pytest.mark.parametrize("target,precision,message", [
    pytest.param("sm90", "float", "needs a GPU of compute capability 9.0; this machine has no GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU")),
    ("sm7", None, "unknown target 'sm7': choose one of cpu, sm89, sm90"),
    ("cpu", "fp8", "unknown precision 'fp8': choose one of float, int8"),
])
def test_bad_target_or_precision_is_a_recipe_error(target, precision, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        for_target(load_recipe(TINY), target, precision)


def test_plan_with_a_bad_target_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hstu_opt", "plan", str(TINY), "--target", "sm7"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "unknown target" in proc.stderr
