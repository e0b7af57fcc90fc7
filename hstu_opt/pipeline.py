"""Resolves stage order, computes cache keys, runs stages, records lineage. Nothing stage-specific.

Each stage's output lives in a content-addressed cache, `<root>/.cache/<stage>/<key>/`, where
key = sha256(stage name, stage version, its recipe sections, its inputs' digests, toolchain).
A stage runs into a temp dir that is renamed into the cache only when it returns, so an
interrupted build never leaves a half artifact; the bundle is then assembled (hard links) in a
temp dir and renamed into `<root>/<name>/<version>/`.

`lookup` is the one place that turns (stage, recipe, upstream digests) into a key and a cache
entry: `run_stages` (build) and `plan` (what a build would do, without doing it) both call it.
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
        "code": stage.code_digests(recipe),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Lookup:
    """A stage's key and cache entry, found before running it."""
    stage: Stage
    key: str | None  # None while an upstream output (and so its digest) does not exist yet
    input_digests: dict[str, str]
    entry: Path | None
    saved: dict | None  # the entry's record when it exists and every file still has its hash
    waits_for: str | None  # the last upstream stage without an output, when key is None


def lookup(stage: Stage, recipe: Recipe, root: Path, digests: dict[str, str | None],
           force: tuple[str, ...] = ()) -> Lookup:
    """Key and cache entry of `stage`, given the output digests of the stages before it (None: not run)."""
    inputs = stage.input_stages(recipe)
    unknown = [name for name in inputs if digests.get(name) is None]
    if unknown:
        return Lookup(stage, None, {}, None, None, unknown[-1])
    input_digests = {name: digests[name] for name in inputs}
    key = cache_key(stage, recipe, input_digests)
    entry = root / ".cache" / stage.name / key
    saved = None if stage.name in force else _load_cached(entry)
    return Lookup(stage, key, input_digests, entry, saved, None)


def plan(recipe: Recipe, root: Path, until: str | None = None) -> list[Lookup]:
    """What `build` would do, without running anything: each stage's key and whether it is cached.
    A stage after an uncached one has no key yet (its key hashes that stage's output)."""
    digests: dict[str, str | None] = {}
    found = []
    for stage in resolve(recipe, until):
        f = lookup(stage, recipe, root, digests)
        digests[stage.name] = digest_of(f.saved["outputs"]) if f.saved is not None else None
        found.append(f)
    return found


def ci_cache_key(recipe: Recipe) -> str:
    """A key for a CI cache of `<root>/.cache`: equal keys mean equal stage keys, so a restored cache
    holds this build's entries. It hashes what every stage key hashes, except the upstream outputs
    (which follow from the rest): the recipe, the stages' names, versions and code digests, the toolchain."""
    stages = resolve(recipe)
    parts = {"recipe": recipe.digest(), "stages": {s.name: s.version for s in stages},
             "toolchain": toolchain.fingerprint(), "code": {s.name: s.code_digests(recipe) for s in stages}}
    return f"{ci_cache_prefix(recipe)}{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]}"


def ci_cache_prefix(recipe: Recipe) -> str:
    """The shared start of this recipe's CI cache keys: restoring by prefix reuses an older cache, whose
    unchanged stages (training, usually) are then still hits."""
    return f"hstu-opt-{recipe.name}-{recipe.version}-"


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
        found = lookup(stage, recipe, root, {name: r.digest for name, r in results.items()}, force)
        assert found.key is not None and found.entry is not None, "every upstream stage has run"
        reporter.stage_started(stage.name)
        saved = found.saved
        cached = saved is not None
        if saved is None:
            saved, _ = _run_stage(stage, recipe, found.key, {n: results[n].path for n in found.input_digests},
                                  root / ".cache" / stage.name, reporter)
        seconds = 0.0 if cached else saved["seconds"]
        results[stage.name] = StageResult(stage, found.key, cached, seconds, saved["outputs"],
                                          digest_of(saved["outputs"]), saved["record"], found.input_digests,
                                          found.entry)
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
