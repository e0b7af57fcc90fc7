"""Build a TensorRT plan whose graph uses the HstuAttention plugin, in a child process.

Why a child: after creating a plugin, TensorRT-RTX's ONNX parser dlopens `libtensorrt_rtx.so`, which the
wheel ships only as `libtensorrt_rtx.so.1`; without it the process aborts (SIGABRT). A symlink of that
name in a directory on LD_LIBRARY_PATH fixes it, but only if set before the process starts
(../shared/ENVIRONMENT.md "TensorRT here"), so the parent makes the symlink in a temp dir and runs

    python -m hstu_opt.backends.tensorrt_build REQUEST.json

which registers the plugin from the given package copy (the bundle's), builds, and writes the description
next to the plan. The parent turns a failure (exit code, signal, last log lines) into a StageError.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hstu_opt.errors import StageError

LIB = "libtensorrt_rtx.so"


def _rtx_library_dir() -> Path | None:
    """Where tensorrt_rtx_libs keeps libtensorrt_rtx.so.1 (None with TensorRT proper)."""
    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / f"{LIB}.1").is_file() else None


def child_env(link_dir: Path) -> dict:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # the plugin package imported is the bundle's copy
    lib = _rtx_library_dir()
    if lib is not None and not (lib / LIB).exists():
        (link_dir / LIB).symlink_to(lib / f"{LIB}.1")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(link_dir), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                     env.get("PYTHONPATH", "")) if p)
    return env


def build_with_plugin(onnx_path: Path, out_dir: Path, name: str, section, contextual_len: int, plugin_dir: Path,
                      namespace: str, arch: int | None, timeout_s: float = 1800) -> dict:
    """tensorrt.build of `onnx_path` in a child process with the plugin package at plugin_dir registered."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hstu-trt-") as tmp:
        request = Path(tmp) / "request.json"
        request.write_text(json.dumps({
            "onnx": str(onnx_path), "out_dir": str(out_dir), "name": name, "section": section.model_dump(mode="json"),
            "contextual_len": contextual_len, "plugin_dir": str(plugin_dir), "namespace": namespace, "arch": arch,
            "result": str(Path(tmp) / "result.json")}))
        proc = subprocess.run([sys.executable, "-m", "hstu_opt.backends.tensorrt_build", str(request)],
                              env=child_env(Path(tmp)), capture_output=True, text=True, timeout=timeout_s)
        result = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            raise StageError(f"{onnx_path.name}: the TensorRT build with the {name} plugin failed ({how}): "
                             f"{' | '.join(tail) or 'no output'}; rerun with --debug, or build it by hand with "
                             f"`python -m hstu_opt.backends.tensorrt_build` and LD_LIBRARY_PATH as child_env sets it")
        return json.loads(result.read_text())


def main(request_path: str) -> None:
    from hstu_opt.backends import tensorrt as trt_backend
    from hstu_opt.recipe import EngineSection

    req = json.loads(Path(request_path).read_text())
    trt = trt_backend.trt_module()
    plugin = trt_backend.register_plugin(trt, Path(req["plugin_dir"]), req["namespace"], req["arch"])
    desc = trt_backend.build(Path(req["onnx"]), Path(req["out_dir"]), req["name"],
                             EngineSection.model_validate(req["section"]), req["contextual_len"])
    desc["plugin"] = plugin
    Path(req["result"]).write_text(json.dumps(desc))


if __name__ == "__main__":
    main(sys.argv[1])
