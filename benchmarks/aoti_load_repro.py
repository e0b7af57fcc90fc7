"""Minimal reproducer: loading an AOTInductor package on the GPU machine's image (ENVIRONMENT.md says
torch 2.11.0+cu130, gcc 13.3: segfault in the loader, even for one nn.Linear).

    python benchmarks/aoti_load_repro.py --out DIR

Builds a one-layer package for CUDA (and one for the CPU), then loads and runs each in a fresh process
with faulthandler on, so a crash leaves its Python stack. Writes aoti_load_repro.json (versions, exit
codes, the last lines of each child's stderr).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

CHILD = """
import faulthandler, sys, torch
faulthandler.enable()
run = torch._inductor.aoti_load_package(sys.argv[1])
x = torch.randn(4, 16, device=sys.argv[2])
out = run(x)
out = out[0] if isinstance(out, (list, tuple)) else out
print("ok", tuple(out.shape), float(out.float().sum()))
"""


def build(device: str, path: Path) -> None:
    model = torch.nn.Linear(16, 16).to(device)
    program = torch.export.export(model, (torch.randn(4, 16, device=device),))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    result = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "gcc": gcc,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "runs": []}
    for device in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        path = args.out / f"linear_{device}.pt2"
        try:
            build(device, path)
        except Exception as exc:  # report, do not hide: a build failure is a result too
            result["runs"].append({"device": device, "stage": "build", "error": repr(exc)[:500]})
            continue
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), device], capture_output=True, text=True,
                              timeout=300)
        result["runs"].append({"device": device, "stage": "load+run in a fresh process", "returncode": proc.returncode,
                               "stdout": proc.stdout[-500:], "stderr_tail": proc.stderr[-3000:]})
        path.unlink(missing_ok=True)  # the package itself is not needed to read the result
    (args.out / "aoti_load_repro.json").write_text(json.dumps(result, indent=2))
    for r in result["runs"]:
        print(r["device"], r["stage"], r.get("returncode", r.get("error")), r.get("stdout", "").strip())
        if r.get("returncode"):
            print(r["stderr_tail"][-1500:])


if __name__ == "__main__":
    main()
