import subprocess
import sys

import pytest

EXE = [sys.executable, "-m", "hstu_opt"]


def run(*args, cwd=None):
    return subprocess.run([*EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("yaml_text,expected", [
    ("name: x\nversion: '1'\nmodel:\n  num_head: 2\n", "unknown key 'model.num_head' (did you mean 'num_heads'?)"),
    ("name: x\nversion: '1'\ntrian: {}\n", "unknown key 'trian' (did you mean 'train'?)"),
    # a misspelled required key: the unknown key and its match, not only "missing 'name'"
    ("nmae: x\nversion: '1'\n", "unknown key 'nmae' (did you mean 'name'?)"),
    ("name: x\nversion: '1'\nmodel:\n  num_heads: two\n", "model.num_heads"),
    ("name: x\nversion: '1'\nmodel: [1, 2\n", "not valid YAML at line"),
    ("version: '1'\n", "missing required key 'name'"),
    ("name: x\nversion: '1'\nquantize: {method: median}\n", "quantize.method"),
])
def test_recipe_mistakes_exit_2_with_one_line(tmp_path, yaml_text, expected):
    path = tmp_path / "r.yaml"
    path.write_text(yaml_text)
    line = one_line_error(run("build", path, "--out", tmp_path / "out"))
    assert expected in line and str(path) in line


def test_missing_recipe_and_debug_traceback(tmp_path):
    line = one_line_error(run("build", tmp_path / "nope.yaml"))
    assert "recipe file not found" in line
    proc = run("--debug", "build", tmp_path / "nope.yaml")
    assert proc.returncode == 2 and "Traceback" in proc.stderr


def test_missing_data_file_names_the_path(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nversion: '1'\ndata: {path: ratings.dat, format: dat}\n")
    line = one_line_error(run("build", path, "--out", tmp_path / "out"))
    assert "ratings.dat: ratings file not found" in line


def test_build_verify_inspect_on_micro_recipe(micro_recipe, tmp_path):
    out = tmp_path / "out"
    proc = run("train-stub", micro_recipe, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "train-stub" in proc.stdout and "ran in" in proc.stdout
    bundle = out / "micro" / "0"
    proc = run("build", micro_recipe, "--out", out, "--until", "train-stub")
    assert "cached" in proc.stdout and "1/1 stages cached" in proc.stdout
    assert run("verify", bundle).returncode == 0
    proc = run("inspect", bundle)
    assert proc.returncode == 0 and "hr@10" in proc.stdout and "torch" in proc.stdout
    (bundle / "train-stub" / "metrics.json").unlink()
    proc = run("verify", bundle)
    assert proc.returncode == 1 and "missing: train-stub/metrics.json" in proc.stderr


def test_verify_on_a_non_bundle(tmp_path):
    line = one_line_error(run("verify", tmp_path))
    assert "no manifest.json" in line
