"""What every Triton kernel test module imports first: a skip marker for machines without Triton, and
Triton's CPU interpreter switched on before any kernel module is imported (and again per test on a
machine without a GPU, in case a test changed it).

    from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: F401 (first)
    pytestmark = needs_triton
"""

import importlib.util
import os

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (make test installs it)")

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def interpret_without_gpu():
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
