"""Versions of every tool that can change a build's output: part of every stage's cache key."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import json
import platform

import torch

import hstu_opt

_DISTS = ("torch", "numpy", "triton", "onnx", "onnxscript", "onnxruntime", "onnx-graphsurgeon", "polygraphy",
          "tensorrt", "tensorrt-rtx-cu13", "safetensors")


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def toolchain() -> dict[str, str | None]:
    info: dict[str, str | None] = {"python": platform.python_version(), "hstu_opt": hstu_opt.__version__,
                                   "machine": platform.machine()}
    info.update({d: _version(d) for d in _DISTS})
    info["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_cc"] = f"{major}.{minor}"
    else:
        info["gpu"] = info["gpu_cc"] = None
    return info


def fingerprint() -> str:
    return hashlib.sha256(json.dumps(toolchain(), sort_keys=True).encode()).hexdigest()
