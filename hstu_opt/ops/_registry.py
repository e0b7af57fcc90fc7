"""Per-op implementation tables.

An implementation registers itself into its op's table; the table imports
`hstu_opt.ops.<op>.<impl>` on first use, so adding a backend is adding a file.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
from typing import Callable

from hstu_opt.errors import BackendUnavailable


class Impl(str, enum.Enum):
    REFERENCE = "reference"
    TRITON = "triton"
    CUTLASS = "cutlass"
    CUTLASS_FP8 = "cutlass_fp8"  # e4m3 projections on the CUTLASS kernels (ops/_fp8.py)


_EXTRA = {Impl.TRITON: "triton", Impl.CUTLASS: "cutlass", Impl.CUTLASS_FP8: "cutlass"}


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

    def resolve(self, impl: Impl | str | dict) -> Impl:
        """The implementation `impl` asks of this op: one Impl for all ops, or a map of op names to
        implementations (ops it does not name: the reference)."""
        return Impl(impl.get(self.op, Impl.REFERENCE) if isinstance(impl, dict) else impl)

    def get(self, impl: Impl | str | dict, entry: str) -> Callable:
        """The `impl` implementation of `entry`. An op that has no such implementation (no file
        `<op>/<impl>.py`) runs its reference, so a model can ask for Triton everywhere; an
        implementation that exists but cannot import (Triton not installed) raises. `impl` may also map
        op names to implementations ({"hstu_attention": "triton"}: the others run their reference)."""
        impl = self.resolve(impl)
        if (impl, entry) not in self._impls:
            module = f"{self._package}.{impl.value}"
            if importlib.util.find_spec(module) is None:
                return self._impls[(Impl.REFERENCE, entry)]
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise BackendUnavailable(f"{self.op}:{impl.value}", exc.name or module, _EXTRA.get(impl, impl.value)) from exc
        if (impl, entry) not in self._impls:
            return self._impls[(Impl.REFERENCE, entry)]
        return self._impls[(impl, entry)]
