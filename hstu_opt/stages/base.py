"""The uniform stage interface. A stage declares the recipe sections and upstream stages that key
it, writes its files into `ctx.out_dir`, and returns a JSON-able record (metrics, summary)."""

from __future__ import annotations

import abc
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Protocol

from hstu_opt.recipe import Recipe


class Reporter(Protocol):
    """How the library shows progress; the CLI renders it with rich, tests pass a silent one."""

    def stage_started(self, name: str) -> None: ...
    def stage_finished(self, name: str, record: dict, cached: bool, seconds: float) -> None: ...
    def task(self, description: str, total: int | None) -> AbstractContextManager[Callable[[int], None]]: ...
    def log(self, message: str) -> None: ...


@dataclass
class StageContext:
    recipe: Recipe
    out_dir: Path  # a fresh temp dir; renamed into the cache only if the stage returns
    inputs: dict[str, Path]  # upstream stage name -> its output dir
    reporter: Reporter


class Stage(abc.ABC):
    name: ClassVar[str]
    version: ClassVar[int] = 1
    sections: ClassVar[tuple[str, ...]]  # recipe sections that change this stage's output
    inputs: ClassVar[tuple[str, ...]] = ()  # upstream stages whose outputs this stage reads

    def enabled(self, recipe: Recipe) -> bool:
        return True

    def key_sections(self, recipe: Recipe) -> tuple[str, ...]:
        """Recipe sections in this stage's cache key with this recipe (`sections` unless a stage's output
        depends on another section only for some recipes)."""
        return self.sections

    def code_digests(self, recipe: Recipe) -> dict[str, str]:
        """Digests of the code this stage compiles or ships into its output with this recipe (kernel sources,
        a prebuilt library), beyond what `version` and the toolchain's hstu_opt version say: part of the cache
        key, so an edited kernel is never served from an entry built before the edit."""
        return {}

    def input_stages(self, recipe: Recipe) -> tuple[str, ...]:
        """Upstream stages read with this recipe (a stage may use an optional one only when it is enabled)."""
        return self.inputs

    @abc.abstractmethod
    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Write the outputs into ctx.out_dir; return a JSON-able record (metrics, a `headline`, `tables`)."""
