"""Lazy imports of optional heavy packages, with an error that names the pip extra."""

import importlib
from types import ModuleType

from hstu_opt.errors import BackendUnavailable


def require(module: str, *, backend: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(backend, module, extra) from exc
