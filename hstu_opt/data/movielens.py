"""MovieLens-format loaders (ML-100k .inter / u.data, ML-1M .dat, ML-20M .csv) and the bundled ML-100k.

The bundled file comes from the `recbole==1.2.1` wheel (installed with --no-deps); it is read
from the package directory, recbole itself is never imported.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hstu_opt.errors import DataError
from hstu_opt.fsutil import sha256_file


@dataclass(frozen=True)
class Interactions:
    users: np.ndarray  # raw user ids (int64)
    items: np.ndarray  # raw item ids (int64)
    ratings: np.ndarray  # float
    timestamps: np.ndarray  # int64 seconds
    fingerprint: str  # sha256 of the source file


def bundled_ml100k() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled ML-100k comes from the recbole wheel: pip install --no-deps recbole==1.2.1 "
                        "(or set data.path to your own ratings file)")
    path = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k" / "ml-100k.inter"
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed recbole package: reinstall recbole==1.2.1")
    return path


def _columns(rows: list[list[str]], path: Path) -> Interactions:
    try:
        arr = np.asarray(rows, dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: non-numeric field ({exc}): check data.format matches the file") from exc
    if arr.ndim != 2 or arr.shape[1] < 4:
        raise DataError(f"{path}: expected 4 columns (user, item, rating, timestamp): check data.format")
    return Interactions(arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2],
                        arr[:, 3].astype(np.int64), sha256_file(path))


def read_ratings(path: Path, fmt: str) -> Interactions:
    """fmt: 'inter' (RecBole TSV with typed header), 'udata' (ML-100k u.data), 'dat' (ML-1M ratings.dat,
    '::'-separated), 'csv' (ML-20M ratings.csv with header)."""
    if not path.is_file():
        raise DataError(f"{path}: ratings file not found: fix data.path (or remove it to use the bundled ML-100k)")
    lines = path.read_text(encoding="latin-1").splitlines()
    if fmt == "inter":
        header = [h.split(":")[0] for h in lines[0].split("\t")]
        want = ["user_id", "item_id", "rating", "timestamp"]
        if any(w not in header for w in want):
            raise DataError(f"{path}: header {header} lacks one of {want}: is data.format right?")
        cols = [header.index(w) for w in want]
        rows = [[f[c] for c in cols] for f in (ln.split("\t") for ln in lines[1:] if ln)]
    elif fmt == "udata":
        rows = [ln.split("\t")[:4] for ln in lines if ln]
    elif fmt == "dat":
        rows = [ln.split("::")[:4] for ln in lines if ln]
    else:
        rows = [ln.split(",")[:4] for ln in lines[1:] if ln]
    if not rows:
        raise DataError(f"{path}: no interactions found: check data.format")
    return _columns(rows, path)
