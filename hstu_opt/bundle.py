"""The versioned bundle: `<root>/<name>/<version>/`, one folder per stage, and manifest.json.

manifest.json pins the recipe, each stage's key, inputs and output hashes, and the toolchain;
`verify` recomputes every checksum.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from hstu_opt import toolchain
from hstu_opt.errors import BundleError
from hstu_opt.fsutil import link_or_copy, replace_dir, sha256_file, write_json_atomic
from hstu_opt.recipe import Recipe

if TYPE_CHECKING:
    from hstu_opt.pipeline import StageResult

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def bundle_dir(root: Path, recipe: Recipe) -> Path:
    return root / recipe.name / recipe.version


def assemble(target: Path, recipe: Recipe, results: list["StageResult"]) -> Path:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        files: dict[str, str] = {}
        stages = {}
        for r in results:
            for rel, meta in r.outputs.items():
                link_or_copy(r.path / rel, tmp / r.stage.name / rel)
                files[f"{r.stage.name}/{rel}"] = meta["sha256"]
            stages[r.stage.name] = {
                "version": r.stage.version, "key": r.key, "cached": r.cached, "seconds": r.seconds,
                "inputs": r.input_digests, "outputs": r.outputs, "digest": r.digest, "record": r.record,
            }
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "name": recipe.name,
            "version": recipe.version,
            "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.model_dump(mode="json"),
            "recipe_sha256": recipe.digest(),
            "toolchain": toolchain.toolchain(),
            "stages": stages,
            "files": files,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        replace_dir(tmp, target)
        return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_manifest(path: Path) -> dict:
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{path}: no {MANIFEST}: pass a bundle directory such as artifacts/<name>/<version>")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest}: not valid JSON ({exc}): rebuild the bundle") from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{manifest}: schema_version {data.get('schema_version')} is not {SCHEMA_VERSION}: "
                          "rebuild the bundle with this hstu-opt")
    return data


def verify(path: Path) -> list[str]:
    """Problems found (empty = the bundle is intact): missing, changed or unlisted files."""
    manifest = load_manifest(path)
    problems = []
    for rel, want in sorted(manifest["files"].items()):
        f = path / rel
        if not f.is_file():
            problems.append(f"missing: {rel}")
        elif sha256_file(f) != want:
            problems.append(f"checksum mismatch: {rel}")
    listed = set(manifest["files"]) | {MANIFEST}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel not in listed:
            problems.append(f"not in manifest: {rel}")
    return problems
