"""Compile cutlass_kernels/*.cu into one shared library, cached by content.

    python -m cutlass_kernels.build --arch sm_90a --out DIR [-j 2] [--check]

The cache key is a sha256 over the sources, the headers, the flags, `nvcc --version` and the CUTLASS
version: DIR/<key[:16]>/ holds the library, each object's ptxas log and build.json (per kernel: compile
seconds, registers, spill bytes, and with --check the SASS checks of `inspect`). A second run with the
same inputs returns at once.

Toolchain: nvcc from $NVCC, else the `nvidia-cuda-nvcc` wheel's (nvidia/cu13/bin), else PATH, else
/usr/local/cuda; CUTLASS headers from $CUTLASS_INCLUDE, else the `nvidia-cutlass` wheel
(cutlass_library/source/include). The library is linked with the host compiler against libcudart.so.13
by soname (the wheel ships no unversioned libcudart.so), so torch's own libcudart.so.13 serves it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cutlass_kernels import HEADERS, HERE, LIB_NAME, SOURCES

DEFAULT_OUT = HERE.parent / ".cache" / "cutlass"


def _wheel_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def nvcc_path() -> Path:
    if os.environ.get("NVCC"):
        return Path(os.environ["NVCC"])
    nvidia = _wheel_dir("nvidia")
    if nvidia and (nvidia / "cu13" / "bin" / "nvcc").exists():
        return nvidia / "cu13" / "bin" / "nvcc"
    found = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(found).exists():
        raise FileNotFoundError("nvcc not found: pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl "
                                "(or set NVCC)")
    return Path(found)


def cutlass_include() -> list[Path]:
    if os.environ.get("CUTLASS_INCLUDE"):
        return [Path(os.environ["CUTLASS_INCLUDE"])]
    lib = _wheel_dir("cutlass_library")
    if lib is None or not (lib / "source" / "include" / "cutlass").is_dir():
        raise FileNotFoundError("CUTLASS headers not found: pip install nvidia-cutlass==4.2.0.0 (or set CUTLASS_INCLUDE)")
    return [lib / "source" / "include", lib / "source" / "tools" / "util" / "include"]


def cudart_dir(nvcc: Path) -> Path | None:
    """The directory holding libcudart.so.13 next to this nvcc (the wheel's lib/ or the toolkit's lib64/)."""
    for d in (nvcc.parent.parent / "lib", nvcc.parent.parent / "lib64"):
        if (d / "libcudart.so.13").exists() or (d / "libcudart.so").exists():
            return d
    return None


def tool(nvcc: Path, name: str) -> Path | None:
    """cuobjdump / nvdisasm next to nvcc (the nvidia-cuda-cuobjdump / -nvdisasm wheels put them there)."""
    p = nvcc.parent / name
    return p if p.exists() else (Path(shutil.which(name)) if shutil.which(name) else None)


def compile_flags(arch: str, nvcc: Path) -> list[str]:
    num = arch.removeprefix("sm_")
    # the explicit -gencode: plain -arch=sm_90a would add a generic compute_90 PTX pass as well
    flags = ["-gencode", f"arch=compute_{num},code=sm_{num}", "-std=c++17", "--expt-relaxed-constexpr", "-O3",
             "-DNDEBUG", "-Xptxas", "-v", "-Xcompiler", "-fPIC"]
    return flags + [f"-I{p}" for p in (HERE, *cutlass_include())]  # HERE: for generated sources (sweep.py)


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def cutlass_version() -> str:
    header = cutlass_include()[0] / "cutlass" / "version.h"
    text = header.read_text() if header.exists() else ""
    parts = [re.search(rf"#define CUTLASS_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts if m) or "unknown"


def sources_digest() -> str:
    """sha256 over the shipped sources and headers alone: a library carried to another machine (built
    there by another nvcc) is the code now only if its build.json has this digest."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return h.hexdigest()


def cache_key(arch: str, nvcc: Path) -> str:
    h = hashlib.sha256(sources_digest().encode())
    # flags without the include paths (where the wheel lies does not change the product)
    h.update(json.dumps([arch, [f for f in compile_flags(arch, nvcc) if not f.startswith("-I")],
                         nvcc_version(nvcc), cutlass_version()]).encode())
    return h.hexdigest()


def parse_ptxas(log: str) -> dict:
    """Registers and spill bytes of each kernel entry in a `-Xptxas -v` log (this build's kernels: one each)."""
    spills = [(int(s), int(l)) for s, l in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    stack = [int(s) for s in re.findall(r"(\d+) bytes stack frame", log)]
    return {"entries": len(regs), "registers": regs, "stack_bytes": stack,
            "spill_store_bytes": sum(s for s, _ in spills), "spill_load_bytes": sum(l for _, l in spills)}


def includes(name: str | Path) -> list[str]:
    """The local headers `name` (a name under cutlass_kernels/, or a path) includes, transitively
    (#include "x.hpp" lines naming files of cutlass_kernels/)."""
    seen: list[str] = []
    todo = [str(name)]
    while todo:
        for inc in re.findall(r'^#include "([^"]+)"', (HERE / todo.pop()).read_text(), re.M):
            if inc not in seen and (HERE / inc).exists():
                seen.append(inc)
                todo.append(inc)
    return sorted(seen)


def object_key(source: str | Path, arch: str, nvcc: Path) -> str:
    """One object's cache key: its source, the local headers it includes, flags, nvcc and CUTLASS versions
    (a new kernel in the library does not recompile the others)."""
    h = hashlib.sha256()
    for name in [str(source), *includes(source)]:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(json.dumps([arch, [f for f in compile_flags(arch, nvcc) if not f.startswith("-I")],
                         nvcc_version(nvcc), cutlass_version()]).encode())
    return h.hexdigest()[:16]


def compile_cached(source: str | Path, arch: str, nvcc: Path, dest: Path) -> dict:
    """Compile one source (a name under cutlass_kernels/, or a path) into dest, or copy it from the
    per-object cache (dest/../objects/<key>/)."""
    stem = Path(source).stem
    cached = dest.parent / "objects" / object_key(source, arch, nvcc)
    if (cached / "kernel.json").exists():
        for suffix in (".o", ".ptxas.log"):
            shutil.copyfile(cached / (stem + suffix), dest / (stem + suffix))
        return json.loads((cached / "kernel.json").read_text()) | {"cached_object": True}
    info = compile_source(source, arch, nvcc, dest)
    cached.mkdir(parents=True, exist_ok=True)
    for suffix in (".o", ".ptxas.log"):
        shutil.copyfile(dest / (stem + suffix), cached / (stem + suffix))
    (cached / "kernel.json").write_text(json.dumps(info))
    return info


def compile_source(source: str | Path, arch: str, nvcc: Path, dest: Path) -> dict:
    """Compile one source (a name under cutlass_kernels/, or a path) into dest/<stem>.o; raises on failure."""
    obj = dest / (Path(source).stem + ".o")
    t0 = time.perf_counter()
    proc = subprocess.run([str(nvcc), *compile_flags(arch, nvcc), "-c", str(HERE / source), "-o", str(obj)],
                          capture_output=True, text=True)
    seconds = round(time.perf_counter() - t0, 1)
    log = proc.stdout + proc.stderr
    (dest / (Path(source).stem + ".ptxas.log")).write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} (exit {proc.returncode}):\n{log[-4000:]}")
    return {"source": str(source), "object": obj.name, "compile_s": seconds, **parse_ptxas(log)}


def link(objects: list[Path], nvcc: Path, lib: Path) -> None:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or "c++"
    libdir = cudart_dir(nvcc)
    cmd = [cxx, "-shared", "-o", str(lib), *map(str, objects), "-Wl,-rpath,$ORIGIN"]
    cmd += ([f"-L{libdir}"] if libdir else []) + ["-l:libcudart.so.13", "-lpthread", "-ldl"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"link failed: {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


def inspect(obj: Path, nvcc: Path | None = None) -> dict:
    """What the product holds: the cubins' architectures (cuobjdump -lelf) and counts of the Hopper
    instructions these kernels must use (HGMMA: bf16 warpgroup MMA; QGMMA: the FP8 one, e4m3 x e4m3 -> F32;
    UTMALDG / UTMASTG: TMA loads and stores),
    from cuobjdump -sass. Without cuobjdump: the architectures only, read from the ELF names in the
    object's embedded fatbin."""
    nvcc = nvcc or nvcc_path()
    cuobjdump = tool(nvcc, "cuobjdump")
    if cuobjdump is None:
        names = sorted(set(re.findall(rb"sm_\d+a?", obj.read_bytes())))
        return {"archs": [n.decode() for n in names], "sass": None}
    elf = subprocess.run([str(cuobjdump), "-lelf", str(obj)], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([str(cuobjdump), "-lptx", str(obj)], capture_output=True, text=True).stdout
    sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    counts = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "UTMALDG", "UTMASTG", "MUFU.TANH")}
    counts["QGMMA.E4M3"] = len(re.findall(r"\bQGMMA\.\w+\.F32\.E4M3\.E4M3\b", sass))
    return {"archs": sorted(set(re.findall(r"\.(sm_\d+a?)\.cubin", elf))),
            "ptx": sorted(set(re.findall(r"\.(sm_\d+a?)\.ptx", ptx))), "sass": counts}


def build(arch: str = "sm_90a", out: Path = DEFAULT_OUT, jobs: int = 1, check: bool = False) -> dict:
    """Build (or find in the cache) the library for `arch`; returns build.json's content plus `lib`."""
    nvcc = nvcc_path()
    dest = Path(out) / cache_key(arch, nvcc)[:16]
    manifest = dest / "build.json"
    if manifest.exists() and (dest / LIB_NAME).exists():
        info = json.loads(manifest.read_text())
        if check and "inspect" not in info["kernels"][0]:
            _add_inspect(info, dest, nvcc)
            manifest.write_text(json.dumps(info, indent=1))
        return info | {"lib": str(dest / LIB_NAME), "cached": True}
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        kernels = list(pool.map(lambda s: compile_cached(s, arch, nvcc, dest), SOURCES))
    link([dest / k["object"] for k in kernels], nvcc, dest / (LIB_NAME + ".tmp"))
    (dest / (LIB_NAME + ".tmp")).rename(dest / LIB_NAME)
    info = {"arch": arch, "nvcc": nvcc_version(nvcc), "cutlass": cutlass_version(), "key": dest.name,
            "sources_sha256": sources_digest(),
            "build_s": round(time.perf_counter() - t0, 1), "jobs": jobs, "kernels": kernels}
    if check:
        _add_inspect(info, dest, nvcc)
    manifest.write_text(json.dumps(info, indent=1))
    return info | {"lib": str(dest / LIB_NAME), "cached": False}


def _add_inspect(info: dict, dest: Path, nvcc: Path) -> None:
    for k in info["kernels"]:
        k["inspect"] = inspect(dest / k["object"], nvcc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cutlass_kernels.build", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("-j", "--jobs", type=int, default=1, help="kernels compiled at once (~3.3 GB of memory each)")
    p.add_argument("--check", action="store_true", help="also disassemble: architectures and HGMMA/TMA counts")
    args = p.parse_args(argv)
    info = build(args.arch, args.out, args.jobs, args.check)
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
