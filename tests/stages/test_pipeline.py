import json
import os
from pathlib import Path

import pytest
import yaml

from hstu_opt import bundle, pipeline
from hstu_opt.errors import BuildLocked
from hstu_opt.recipe import load_recipe
from hstu_opt.stages import STAGES


def _edit(path: Path, section: str, key: str, value) -> None:
    raw = yaml.safe_load(path.read_text())
    raw.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(raw))


def test_rerun_is_cached_and_a_changed_section_reruns_only_downstream(micro_recipe, tmp_path, reporter):
    root = tmp_path / "out"
    recipe = load_recipe(micro_recipe)
    names = [s.name for s in pipeline.resolve(recipe)]
    assert names == [s.name for s in STAGES]  # the micro recipe runs every stage
    pipeline.build(recipe, root, reporter)
    assert reporter.ran() == names

    reporter.events.clear()
    pipeline.build(recipe, root, reporter)
    assert reporter.ran() == [] and reporter.cached() == names

    # bench's own section: only bench reruns
    reporter.events.clear()
    _edit(micro_recipe, "bench", "repeats", 3)
    pipeline.build(load_recipe(micro_recipe), root, reporter)
    assert reporter.ran() == ["bench"]

    # the quantize section: calibrate-int8 and what reads it rerun; train, export and fuse stay cached
    reporter.events.clear()
    _edit(micro_recipe, "quantize", "method", "minmax")
    pipeline.build(load_recipe(micro_recipe), root, reporter)
    assert reporter.ran() == ["calibrate-int8", "build-engine", "bench"]
    assert reporter.cached() == ["train-stub", "export-onnx", "fuse"]


def test_interrupted_stage_leaves_no_bundle_and_no_cache_entry(micro_recipe, tmp_path, reporter, monkeypatch):
    root = tmp_path / "out"
    recipe = load_recipe(micro_recipe)
    first = STAGES[0]

    def boom(self, ctx):
        (ctx.out_dir / "half-written.bin").write_bytes(b"x" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(type(first), "run", boom)
    with pytest.raises(KeyboardInterrupt):
        pipeline.build(recipe, root, reporter)
    assert not bundle.bundle_dir(root, recipe).exists()
    leftovers = [p for p in (root / ".cache").rglob("*") if p.is_file()]
    assert leftovers == []


def test_lock_stops_a_second_build(micro_recipe, tmp_path, reporter):
    from filelock import FileLock

    root = tmp_path / "out"
    recipe = load_recipe(micro_recipe)
    target = bundle.bundle_dir(root, recipe)
    target.parent.mkdir(parents=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        with pytest.raises(BuildLocked, match="another build"):
            pipeline.build(recipe, root, reporter)


def test_manifest_and_verify_catches_one_flipped_byte(micro_recipe, tmp_path, reporter):
    root = tmp_path / "out"
    recipe = load_recipe(micro_recipe)
    path, results = pipeline.build(recipe, root, reporter, until="train-stub")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["recipe"]["name"] == "micro"
    assert {"python", "torch", "onnx", "onnxruntime", "triton", "cuda", "gpu"} <= set(manifest["toolchain"])
    train = manifest["stages"]["train-stub"]
    assert len(train["key"]) == 64 and "checkpoint/model.safetensors" in train["outputs"]
    assert bundle.verify(path) == []

    victim = path / "train-stub" / "checkpoint" / "model.safetensors"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    os.unlink(victim)  # break the hard link so the cache keeps its good copy
    victim.write_bytes(bytes(data))
    assert bundle.verify(path) == ["checksum mismatch: train-stub/checkpoint/model.safetensors"]

    victim.unlink()
    assert bundle.verify(path) == ["missing: train-stub/checkpoint/model.safetensors"]


def test_a_corrupted_cache_entry_is_rebuilt(micro_recipe, tmp_path, reporter):
    root = tmp_path / "out"
    recipe = load_recipe(micro_recipe)
    _, results = pipeline.build(recipe, root, reporter, until="train-stub")
    metrics = results[0].path / "metrics.json"
    os.chmod(metrics, 0o644)
    metrics.write_text("{}")
    reporter.events.clear()
    pipeline.build(recipe, root, reporter, until="train-stub")
    assert reporter.ran() == ["train-stub"]


def test_compiled_engine_through_the_pipeline(micro_recipe, tmp_path, reporter):
    """build-engine's `compiled` backend: built from the checkpoint for the bench grid's shapes, warm-started
    in a fresh process, listed in engines.json and benchmarked next to eager."""
    _edit(micro_recipe, "engine", "backends", ["onnxruntime", "compiled"])
    path, _ = pipeline.build(load_recipe(micro_recipe), tmp_path / "out", reporter)
    engine = json.loads((path / "build-engine" / "engines.json").read_text())["compiled"]["ranking"]
    assert engine["shapes"] == [[1, 24, 4], [4, 24, 4]] and engine["device"] == "cpu"
    assert engine["warm_start"]["max_abs_diff_vs_cold"] == 0.0 and engine["warm_start"]["nonfinite"] == 0
    assert not engine["warm_start"]["inductor_cache"].get("fxgraph_cache_miss")
    bench = json.loads((path / "bench" / "bench.json").read_text())
    assert {r["backend"] for r in bench["rows"]} == {"eager", "onnxruntime.fp32", "onnxruntime.int8", "compiled"}

    # its warmed shapes come from the bench grid, so a bench edit rebuilds the engines (and only those)
    reporter.events.clear()
    _edit(micro_recipe, "bench", "batch_sizes", [2])
    path, _ = pipeline.build(load_recipe(micro_recipe), tmp_path / "out", reporter)
    assert reporter.ran() == ["build-engine", "bench"]
    engine = json.loads((path / "build-engine" / "engines.json").read_text())["compiled"]["ranking"]
    assert engine["shapes"] == [[2, 24, 4]]


def test_an_edited_kernel_rebuilds_the_engines_and_nothing_before_them(micro_recipe, tmp_path, reporter, monkeypatch):
    """build-engine's key holds the digests of the code it compiles or ships (Stage.code_digests): the
    plugin package (CI found a plan cached from before a kernel edit would have been reused)."""
    from hstu_opt.stages.build_engine import BuildEngine

    root = tmp_path / "out"
    recipe = load_recipe(micro_recipe)
    pipeline.build(recipe, root, reporter)
    before = BuildEngine().code_digests(recipe)
    reporter.events.clear()
    monkeypatch.setattr(BuildEngine, "code_digests", lambda self, r: {k: "edited" for k in before} | {"x": "edited"})
    pipeline.build(recipe, root, reporter)
    # (bench reruns only if the rebuilt engines differ: its key hashes build-engine's outputs)
    assert reporter.ran()[0] == "build-engine" and set(reporter.ran()) <= {"build-engine", "bench"}
    assert reporter.cached()[:4] == ["train-stub", "export-onnx", "fuse", "calibrate-int8"]


def test_code_digests_follow_the_sources(tmp_path):
    from hstu_opt.fsutil import source_digest
    from hstu_opt.stages.build_engine import BuildEngine

    (tmp_path / "k" / "__pycache__").mkdir(parents=True)
    (tmp_path / "k" / "a.py").write_text("x = 1\n")
    first = source_digest(tmp_path, "k")
    (tmp_path / "k" / "__pycache__" / "a.cpython.pyc").write_bytes(b"ignored")
    assert source_digest(tmp_path, "k") == first
    (tmp_path / "k" / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path, "k") != first

    recipe = load_recipe(Path(__file__).parent.parent.parent / "recipes" / "tiny.yaml")
    assert set(BuildEngine().code_digests(recipe)) == {"hstu_attention_plugin"}  # tensorrt + fused plugin
    compiled = recipe.model_copy(update={"engine": recipe.engine.model_copy(update={
        "backends": ("onnxruntime", "compiled"), "ops": {"uvqk": "cutlass", "hstu_attention": "triton"}})})
    got = BuildEngine().code_digests(compiled)
    assert set(got) == {"hstu_opt", "cutlass_lib"} and len(got["hstu_opt"]) == 64
