"""Per-op implementation tables.

An implementation registers itself into its op's table; the table imports
`hstu_opt.ops.<op>.<impl>` on first use, so adding a backend is adding a file.
"""

from __future__ import annotations

import enum
import importlib
from typing import Callable

from hstu_opt.errors import BackendUnavailable


class Impl(str, enum.Enum):
    REFERENCE = "reference"
    TRITON = "triton"
    CUTLASS = "cutlass"


_EXTRA = {Impl.TRITON: "triton", Impl.CUTLASS: "cutlass"}


class OpTable:
    def __init__(self, op: str, package: str):
        self.op = op
        self._package = package
        self._impls: dict[tuple[Impl, str], Callable] = {}

    def register(self, impl: Impl, entry: str | None = None) -> Callable[[Callable], Callable]:
        def deco(fn: Callable) -> Callable:
            self._impls[(impl, entry or fn.__name__)] = fn
            return fn

        return deco

    def get(self, impl: Impl | str, entry: str) -> Callable:
        impl = Impl(impl)
        if (impl, entry) not in self._impls:
            module = f"{self._package}.{impl.value}"
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith(self._package):
                    raise BackendUnavailable(f"{self.op}:{impl.value}", module, _EXTRA.get(impl, impl.value)) from exc
                raise BackendUnavailable(f"{self.op}:{impl.value}", exc.name or module, _EXTRA.get(impl, impl.value)) from exc
        try:
            return self._impls[(impl, entry)]
        except KeyError:
            raise BackendUnavailable(f"{self.op}.{entry}:{impl.value}", f"{self._package}.{impl.value}", _EXTRA.get(impl, impl.value)) from None

    def implementations(self) -> list[Impl]:
        return sorted({impl for impl, _ in self._impls}, key=lambda i: i.value)
