"""Compile the plugin's kernel to cubins ahead of time, without a GPU: Triton's compiler for a named
target (GPUTarget("cuda", arch, 32)), one cubin per (dtype, head dim) of spec.variants, written with the
launch metadata the run time needs without Triton (kernel name, shared memory, warps, parameter list,
trailing scratch arguments) into cubins/sm_<arch>/.

    python -m plugins.hstu_attention.compile --arch 89 90 [--out DIR]

manifest.json records the Triton version and the sha256 of the kernel source (kernel.py + the shared
Triton pieces it imports): `is_current` compares it, so stale cubins are recompiled, never shipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path

from . import spec

HERE = Path(__file__).resolve().parent
CUBINS = HERE / "cubins"
TRITON_TYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def source_digest(arch: int) -> str:
    """sha256 over what the cubins for `arch` are made from: kernel.py, hstu-opt's shared Triton helpers it
    imports, and spec.py's arguments, variants, constants and tiles (not the rest of spec.py)."""
    import hstu_opt.ops._triton as shared

    h = hashlib.sha256()
    for path in (HERE / "kernel.py", Path(shared.__file__)):
        h.update(path.read_bytes())
    made_of = {"args": spec.ARGS, "align": spec.POINTER_ALIGN, "variants": [
        [t, d, spec.constexprs(t, d), spec.tiles(t, arch)] for t, d in spec.variants(arch)]}
    h.update(json.dumps(made_of, sort_keys=True).encode())
    return h.hexdigest()


def ptx_params(ptx: str, name: str) -> list[str]:
    """The .param declarations of the kernel's .entry (what cuLaunchKernel's parameter array must hold)."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if not m:
        raise RuntimeError(f"no .entry {name} in the PTX")
    return re.findall(r"\.param\s+\.(\w+)", m.group(1))


def cubin_arch(data: bytes) -> int:
    """The SM a cubin is for, from its ELF header (EM_CUDA): the CUDA ELF ABI v1 (OSABI 0x33) keeps it in
    e_flags' low byte, v2 (OSABI 0x41, CUDA 12.8+ toolchains for sm_90+) in the next byte."""
    import struct

    if data[:4] != b"\x7fELF" or struct.unpack_from("<H", data, 18)[0] != 190:
        raise ValueError("not a CUDA ELF (cubin)")
    flags = struct.unpack_from("<I", data, 48)[0]
    return (flags >> 8) & 0xFF if data[7] == 0x41 else flags & 0xFF


def compile_variant(arch: int, dtype: str, d: int) -> tuple[bytes, dict]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .kernel import hstu_attention_padded as fn

    fp = TRITON_TYPES[dtype]
    consts = spec.constexprs(dtype, d)
    signature = {name: ("*" + fp if ty == "*fp" else ty) for name, ty in spec.ARGS}
    signature |= {k: "constexpr" for k in consts}
    pointers = [i for i, (_, ty) in enumerate(spec.ARGS) if ty.startswith("*")]
    attrs = {(i,): [["tt.divisibility", spec.POINTER_ALIGN]] for i in pointers}
    t = spec.tiles(dtype, arch)
    src = ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": t["num_warps"], "num_stages": t["num_stages"], "enable_fp_fusion": True})
    md = kernel.metadata
    params = ptx_params(kernel.asm["ptx"], md.name)
    scratch = len(params) - len(spec.ARGS)
    if md.global_scratch_size or md.profile_scratch_size or getattr(md, "num_ctas", 1) != 1 or scratch < 0:
        raise RuntimeError(f"{md.name}: needs scratch memory or clusters ({md.global_scratch_size}, "
                           f"{md.profile_scratch_size}, {getattr(md, 'num_ctas', 1)}), which runtime.py does not provide")
    limit = spec.SHARED_LIMIT_KB.get(arch, 48) * 1024
    if md.shared > limit:
        raise RuntimeError(f"{md.name} ({dtype}, d={d}) takes {md.shared} bytes of shared memory; sm_{arch} allows "
                           f"{limit}: give spec.tiles fewer stages or smaller tiles for this target")
    meta = {"kernel": md.name, "shared": md.shared, "num_warps": md.num_warps, "threads": 32 * md.num_warps,
            "block_m": consts["BLOCK_M"], "params": params, "trailing_null_pointers": scratch,
            "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
            "launch_pdl": bool(getattr(md, "launch_pdl", False)), "dtype": dtype, "head_dim": d, "arch": arch}
    return kernel.asm["cubin"], meta


def compile_arch(arch: int, out: Path = CUBINS) -> dict:
    """Compile every variant for `arch` into out/sm_<arch>/ and return its manifest."""
    import triton

    folder = out / f"sm_{arch}"
    folder.mkdir(parents=True, exist_ok=True)
    triton.knobs.compilation.disable_line_info = True  # (line tables would double the cubins)
    kernels, started = {}, time.perf_counter()
    for dtype, d in spec.variants(arch):
        t0 = time.perf_counter()
        cubin, meta = compile_variant(arch, dtype, d)
        name = spec.variant(dtype, d)
        (folder / f"{name}.cubin").write_bytes(cubin)
        kernels[name] = meta | {"cubin": f"{name}.cubin", "sha256": hashlib.sha256(cubin).hexdigest(),
                                "compile_s": round(time.perf_counter() - t0, 2)}
    manifest = {"arch": arch, "triton": triton.__version__, "source_sha256": source_digest(arch),
                "args": [list(a) for a in spec.ARGS], "plugin": {"name": spec.NAME, "version": spec.VERSION},
                "compile_s": round(time.perf_counter() - started, 2), "kernels": kernels}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def compile_arch_in_child(arch: int, out: Path = CUBINS) -> dict:
    """compile_arch in a fresh Python process without TRITON_INTERPRET: with the interpreter on (as in the
    test suite, or a user's debugging shell) `triton.jit` makes InterpretedFunctions, which Triton's AOT
    compiler cannot take. Returns the manifest it wrote; a failure raises with the child's last lines."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(HERE.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "plugins.hstu_attention.compile", "--arch", str(arch), "--out", str(out), "--force"]
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"compiling the HstuAttention cubins for sm_{arch} failed ({' '.join(cmd[1:])}):\n{tail}")
    return json.loads((out / f"sm_{arch}" / "manifest.json").read_text())


def is_current(folder: Path) -> bool:
    """Whether folder (cubins/sm_XX) holds every variant, compiled from today's kernel source."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    arch = manifest.get("arch", 0)
    want = {spec.variant(t, d) for t, d in spec.variants(arch)}
    return (manifest.get("source_sha256") == source_digest(arch) and want <= set(manifest["kernels"])
            and all((folder / k["cubin"]).is_file() for k in manifest["kernels"].values()))


def ensure(arch: int, out: Path = CUBINS) -> Path:
    """out/sm_<arch>, compiled now unless it is current."""
    folder = out / f"sm_{arch}"
    if not is_current(folder):
        compile_arch_in_child(arch, out)
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[89, 90], help="compute capabilities, e.g. 89 90")
    ap.add_argument("--out", type=Path, default=CUBINS)
    ap.add_argument("--force", action="store_true", help="recompile even when current")
    args = ap.parse_args(argv)
    for arch in args.arch:
        if not args.force and is_current(args.out / f"sm_{arch}"):
            print(f"sm_{arch}: current")
            continue
        m = compile_arch(arch, args.out)
        print(f"sm_{arch}: {len(m['kernels'])} cubins in {m['compile_s']} s (triton {m['triton']})")


if __name__ == "__main__":
    main()
