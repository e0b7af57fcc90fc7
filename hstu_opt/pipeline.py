"""Resolves stage order, computes cache keys, runs stages, records lineage. Nothing stage-specific.

Each stage's output lives in a content-addressed cache, `<root>/.cache/<stage>/<key>/`, where
key = sha256(stage name, stage version, its recipe sections, its inputs' digests, toolchain).
A stage runs into a temp dir that is renamed into the cache only when it returns, so an
interrupted build never leaves a half artifact; the bundle is then assembled (hard links) in a
temp dir and renamed into `<root>/<name>/<version>/`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from hstu_opt import bundle, toolchain
from hstu_opt.errors import BuildLocked, StageError
from hstu_opt.fsutil import digest_of, hash_tree, replace_dir, write_json_atomic
from hstu_opt.recipe import Recipe
from hstu_opt.stages import STAGES
from hstu_opt.stages.base import Reporter, Stage, StageContext

RECORD = "_stage.json"


@dataclass
class StageResult:
    stage: Stage
    key: str
    cached: bool
    seconds: float
    outputs: dict[str, dict]  # relpath -> {sha256, size}
    digest: str
    record: dict
    input_digests: dict[str, str]
    path: Path


def resolve(recipe: Recipe, until: str | None = None) -> list[Stage]:
    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise StageError(f"unknown stage '{until}': choose one of {', '.join(names)}")
    chosen = STAGES if until is None else STAGES[: names.index(until) + 1]
    enabled = [s for s in chosen if s.enabled(recipe)]
    have = {s.name for s in enabled}
    for s in enabled:
        missing = [i for i in s.input_stages(recipe) if i not in have]
        if missing:
            raise StageError(f"stage '{s.name}' needs {missing}, which the recipe disables: enable them")
    return enabled


def cache_key(stage: Stage, recipe: Recipe, input_digests: dict[str, str]) -> str:
    parts = {
        "stage": stage.name,
        "version": stage.version,
        "sections": {name: recipe.section(name).digest() for name in stage.key_sections(recipe)},
        "inputs": input_digests,
        "toolchain": toolchain.fingerprint(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _load_cached(entry: Path) -> dict | None:
    """A cache entry is usable only if its record exists and every file still has its recorded hash."""
    record_path = entry / RECORD
    if not record_path.is_file():
        return None
    saved = json.loads(record_path.read_text())
    current = {k: v for k, v in hash_tree(entry).items() if k != RECORD}
    return saved if current == saved["outputs"] else None


def _run_stage(stage: Stage, recipe: Recipe, key: str, inputs: dict[str, Path], cache: Path,
               reporter: Reporter) -> tuple[dict, float]:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".tmp-{key[:12]}-"))
    try:
        t0 = time.perf_counter()
        record = stage.run(StageContext(recipe=recipe, out_dir=tmp, inputs=inputs, reporter=reporter))
        seconds = time.perf_counter() - t0
        outputs = hash_tree(tmp)
        saved = {"stage": stage.name, "version": stage.version, "key": key, "record": record, "outputs": outputs,
                 "seconds": round(seconds, 3)}
        write_json_atomic(tmp / RECORD, saved)
        replace_dir(tmp, cache / key)
        return saved, seconds
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_stages(recipe: Recipe, root: Path, reporter: Reporter, until: str | None = None,
               force: tuple[str, ...] = ()) -> list[StageResult]:
    results: dict[str, StageResult] = {}
    for stage in resolve(recipe, until):
        input_digests = {name: results[name].digest for name in stage.input_stages(recipe)}
        key = cache_key(stage, recipe, input_digests)
        entry = root / ".cache" / stage.name / key
        reporter.stage_started(stage.name)
        saved = None if stage.name in force else _load_cached(entry)
        cached = saved is not None
        if saved is None:
            saved, _ = _run_stage(stage, recipe, key, {n: results[n].path for n in input_digests},
                                  root / ".cache" / stage.name, reporter)
        seconds = 0.0 if cached else saved["seconds"]
        results[stage.name] = StageResult(stage, key, cached, seconds, saved["outputs"], digest_of(saved["outputs"]),
                                          saved["record"], input_digests, entry)
        reporter.stage_finished(stage.name, saved["record"], cached, seconds)
    return list(results.values())


def build(recipe: Recipe, root: Path, reporter: Reporter, until: str | None = None,
          force: tuple[str, ...] = ()) -> tuple[Path, list[StageResult]]:
    """Run (or reuse) every stage up to `until` and assemble the bundle. Returns (bundle dir, results)."""
    target = bundle.bundle_dir(root, recipe)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise BuildLocked(f"{target}: another build is writing this bundle (lock {lock.lock_file}): "
                          "wait for it to finish, or remove the lock file if no build is running") from None
    try:
        results = run_stages(recipe, root, reporter, until, force)
        bundle.assemble(target, recipe, results)
        return target, results
    finally:
        lock.release()
