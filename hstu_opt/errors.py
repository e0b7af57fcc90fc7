"""One exception hierarchy. Every message says what was wrong and what to do about it.

The CLI is the only place that turns these into a one-line message and exit code 2.
"""


class HstuOptError(Exception):
    """A user-facing error: bad recipe, missing file, incompatible checkpoint, missing backend."""


class RecipeError(HstuOptError):
    """The recipe file is unreadable or a field is wrong."""


class DataError(HstuOptError):
    """A dataset file is missing or malformed."""


class CheckpointError(HstuOptError):
    """A checkpoint does not match the recipe's model, or is unreadable."""


class BackendUnavailable(HstuOptError):
    """An optional backend package is not installed."""

    def __init__(self, backend: str, module: str, extra: str):
        super().__init__(
            f"backend '{backend}' needs the Python module '{module}', which is not installed: "
            f"pip install 'hstu-opt[{extra}]'"
        )


class BundleError(HstuOptError):
    """A bundle is missing, incomplete or fails verification."""


class BuildLocked(HstuOptError):
    """Another build holds the lock for this bundle."""


class StageError(HstuOptError):
    """A stage cannot run with the inputs it was given."""


class ServeError(HstuOptError):
    """`hstu-opt serve` cannot start as asked (bad option, engine missing from the bundle, port taken)."""
