"""The HstuAttention TensorRT plugin's run time on a GPU without TensorRT (the H200: no tensorrt there, and
TensorRT-RTX refuses sm_90): its `enqueue` called directly with device buffers, stand-in tensor descriptors
shaped like TensorRT's (.type with a DataType name, .dims) and torch's current stream, launching the cubins
compiled ahead of time on the CPU machine (plugins/hstu_attention/cubins/sm_90, committed; no Triton
involved in the launch).

    python benchmarks/gpu_plugin.py [--out DIR]          # GPU: the sweep + timing, < 3 minutes on the H200
    python benchmarks/gpu_plugin.py --smoke [--out DIR]  # CPU: the same kernel source in Triton's interpreter

1. Correctness: every (head dim, dtype) the plugin accepts (spec.HEAD_DIMS x fp32/fp16/bf16) x every mask
   option (targets or none, contextual rows, a window, min_full_attn_seq_len) x int64 / int32 lengths, odd
   lengths with padding slots (NaN in the inputs' padding, the output NaN-poisoned), against the float64
   reference (ops/hstu_attention/reference.py, the spec, itself checked against HSTU.md's pseudo-code).
2. Speed at dlrm-v3 batch 16 (16 users x 4 heads, 4 contextual + 4096 history + 256 candidate rows, d=128,
   bf16): the plugin's enqueue vs the hstu-opt Triton op (jagged, its router's best kernel) and a bf16
   8192^3 matmul ceiling measured in the same run.
Writes gpu_plugin_<date>.json (date, GPU, versions, every row) to --out; exits 1 on any failed check.
"""

from __future__ import annotations

import argparse
import enum
import itertools
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from hstu_opt.ops.hstu_attention import reference  # noqa: E402
from plugins.hstu_attention import spec  # noqa: E402
from plugins.hstu_attention.runtime import Runtime, _pack  # noqa: E402

DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT32 INT64")  # stand-in for trt.DataType (read by .name)
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TRT_NAME = {"fp32": "FLOAT", "fp16": "HALF", "bf16": "BF16"}
TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 2e-2}  # max |err| / max |want|
MASKS = {  # name: (C, window, min_full, has_targets)
    "causal": (0, 0, 0, 0), "targets": (0, 0, 0, 1), "ctx+targets": (3, 0, 0, 1), "window": (0, 5, 0, 1),
    "window+min_full": (0, 5, 3, 1), "ctx+window+min_full": (3, 5, 3, 1),
}


def desc(type_name: str, dims) -> SimpleNamespace:
    return SimpleNamespace(type=DataType[type_name], dims=tuple(int(x) for x in dims))


def padded_case(hl, nc, C, H, d, dtype, dev, gen, nh=None, ncw=None):
    """q/k/v [B, n, H, d] on the padded layout with NaN in every padding slot, and each user's valid rows."""
    B = len(hl)
    nh = nh or max(hl)
    ncw = max(nc) if ncw is None else ncw
    n = C + nh + ncw
    qkv = [torch.full((B, n, H, d), float("nan"), dtype=dtype) for _ in range(3)]
    rows = []
    for b in range(B):
        r = list(range(C + hl[b])) + list(range(C + nh, C + nh + nc[b]))
        rows.append(r)
        for t in qkv:
            t[b, r] = torch.randn(len(r), H, d, generator=gen).to(dtype)
    return [t.to(dev) for t in qkv], rows, n, nh


def reference_padded(q, k, v, rows, nc, attrs):
    """float64 reference (jagged, ops/hstu_attention/reference.py) scattered back to the padded layout."""
    jag = [torch.cat([t[b, r] for b, r in enumerate(rows)]).double() for t in (q, k, v)]
    lengths = torch.tensor([len(r) for r in rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(q.device)
    nt = torch.tensor(nc if attrs.has_targets else [0] * len(nc), device=q.device)
    out = reference.hstu_attention(*jag, offsets, nt, attrs.max_seq_len, attrs.alpha, attrs.contextual_len,
                                   attrs.max_attn_len, attrs.min_full_attn_seq_len)
    want = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64, device=q.device)
    for b, r in enumerate(rows):
        want[b, r] = out[int(offsets[b]):int(offsets[b + 1])]
    return want


def run_plugin(rt: Runtime, q, k, v, hl, nc, nh, length_dtype, out):
    """What TensorRT does for one node: descriptors + device pointers + its stream, into rt.enqueue."""
    lt = "INT64" if length_dtype == torch.int64 else "INT32"
    lens = [torch.tensor(x, dtype=length_dtype, device=q.device) for x in (hl, nc, [nh])]
    dtype = TRT_NAME[{v_: k_ for k_, v_ in TORCH.items()}[q.dtype]]
    input_desc = [desc(dtype, q.shape), desc(dtype, k.shape), desc(dtype, v.shape), desc(lt, [len(hl)]),
                  desc(lt, [len(nc)]), desc(lt, [1])]
    output_desc = [desc(dtype, out.shape)]
    ptrs = [t.data_ptr() for t in (q, k, v, *lens)]
    if SMOKE:  # no driver: check the arguments enqueue would pack, then run the same source in the interpreter
        meta = json.loads((rt.cubin_root / "sm_90" / "manifest.json").read_text())["kernels"][
            spec.variant(*Runtime.variant_of(input_desc))]
        grid, values = rt.launch_args(input_desc, ptrs, [out.data_ptr()], meta)
        _pack(values, meta["params"])
        from plugins.hstu_attention import kernel

        return kernel.launch(q, k, v, out, *lens, rt.attrs, interpret=True)
    rt.enqueue(input_desc, output_desc, ptrs, [out.data_ptr()], 0, torch.cuda.current_stream().cuda_stream)
    return out


def check(case: dict, dev, gen) -> dict:
    C, window, full, targets = MASKS[case["mask"]]
    dtype, d = TORCH[case["dtype"]], case["d"]
    hl, nc = case["hl"], (case["nc"] if targets else [0] * len(case["hl"]))
    (q, k, v), rows, n, nh = padded_case(hl, nc, C, case["H"], d, dtype, dev, gen, ncw=max(nc) if targets else 0)
    attrs = spec.Attributes(alpha=d ** -0.5, max_seq_len=n + 5, contextual_len=C, max_attn_len=window,
                            min_full_attn_seq_len=full, has_targets=targets)
    rt = Runtime(attrs, ROOT / "plugins" / "hstu_attention" / "cubins", arch=None if not SMOKE else 90)
    out = torch.full(q.shape[:3] + (v.shape[-1],), float("nan"), dtype=dtype, device=dev)
    run_plugin(rt, q, k, v, hl, nc, nh, case["lengths"], out)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    want = reference_padded(q, k, v, rows, nc, attrs)
    err = float((out.double() - want).abs().max() / want.abs().max().clamp(min=1e-30))
    nonfinite = int((~torch.isfinite(out)).sum())
    return case | {"lengths": str(case["lengths"]).split(".")[-1], "rel_err": err, "nonfinite": nonfinite,
                   "passed": nonfinite == 0 and err <= TOL[case["dtype"]]}


def cases(smoke: bool) -> list[dict]:
    if smoke:
        return [{"d": d, "dtype": t, "mask": m, "H": 2, "hl": [70, 3], "nc": [2, 5], "lengths": torch.int64}
                for d, t, m in [(32, "fp32", "ctx+window+min_full"), (50, "fp16", "ctx+targets"), (64, "fp32", "causal")]]
    out = []
    for d, t, m in itertools.product(spec.HEAD_DIMS, ("fp32", "fp16", "bf16"), MASKS):
        for lengths in (torch.int64, torch.int32):
            out.append({"d": d, "dtype": t, "mask": m, "H": 2, "hl": [200, 1, 77, 130], "nc": [9, 3, 0, 16],
                        "lengths": lengths})
    return out


def timing(dev) -> dict:
    """dlrm-v3 batch 16: the plugin vs the hstu-opt Triton op, and the bf16 matmul ceiling, same run."""
    from triton.testing import do_bench

    from hstu_opt import ops
    from hstu_opt.ops import Impl

    B, C, Nh, Nc, H, d = 16, 4, 4096, 256, 4, 128
    gen = torch.Generator().manual_seed(1)
    (q, k, v), rows, n, nh = padded_case([Nh] * B, [Nc] * B, C, H, d, torch.bfloat16, dev, gen)
    N = n
    attrs = spec.Attributes(alpha=d ** -0.5, max_seq_len=N, contextual_len=C)
    rt = Runtime(attrs, ROOT / "plugins" / "hstu_attention" / "cubins")
    out = torch.empty_like(q)
    hl, nc = [Nh] * B, [Nc] * B
    lens = [torch.tensor(x, dtype=torch.int64, device=dev) for x in (hl, nc, [nh])]
    input_desc = [desc("BF16", q.shape)] * 3 + [desc("INT64", [B]), desc("INT64", [B]), desc("INT64", [1])]
    ptrs = [t.data_ptr() for t in (q, k, v, *lens)]
    stream = torch.cuda.current_stream().cuda_stream
    plugin_ms = do_bench(lambda: rt.enqueue(input_desc, input_desc[:1], ptrs, [out.data_ptr()], 0, stream),
                         warmup=25, rep=200)
    qj, kj, vj = (t.reshape(B * n, H, d).contiguous() for t in (q, k, v))  # no padding slots: jagged == padded
    offsets = torch.arange(0, B * n + 1, n, device=dev)
    nt = torch.full((B,), Nc, device=dev)
    triton_ms = do_bench(lambda: ops.hstu_attention(qj, kj, vj, offsets, nt, max_seq_len=N, alpha=attrs.alpha,
                                                    contextual_len=C, max_attn_len=0, impl=Impl.TRITON),
                         warmup=25, rep=200)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm_ms = do_bench(lambda: a @ b, warmup=50, rep=300)
    hist = C + Nh
    flops = 2 * 2 * B * H * d * (hist * (hist + 1) / 2 + Nc * hist + Nc)  # the visible (i, j) pairs
    mm_tflops = 2 * 8192 ** 3 / mm_ms / 1e9
    return {"shape": {"B": B, "C": C, "history": Nh, "candidates": Nc, "H": H, "d": d, "dtype": "bf16"},
            "plugin_ms": plugin_ms, "triton_op_ms": triton_ms, "plugin_over_triton": plugin_ms / triton_ms,
            "plugin_tflops": flops / plugin_ms / 1e9, "triton_op_tflops": flops / triton_ms / 1e9,
            "matmul_bf16_tflops": mm_tflops, "plugin_over_matmul_rate": flops / plugin_ms / 1e9 / mm_tflops}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "cuda.bindings"):
        try:
            out[mod] = __import__(mod, fromlist=["x"]).__version__
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            out[mod] = f"unavailable: {exc}"
    cubins = ROOT / "plugins" / "hstu_attention" / "cubins" / "sm_90" / "manifest.json"
    out["cubins_compiled_with_triton"] = json.loads(cubins.read_text())["triton"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="CPU: Triton's interpreter, a few cases, no timing")
    args = ap.parse_args()
    dev = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --smoke on a CPU")
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    rows = [check(c, dev, gen) for c in cases(args.smoke)]
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "smoke": args.smoke,
              "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "none (interpreter)",
              "versions": versions(), "checks": rows, "check_seconds": time.perf_counter() - t0}
    if not args.smoke:
        result["timing"] = timing(dev)
    failed = [r for r in rows if not r["passed"]]
    result["summary"] = {"checks": len(rows), "failed": len(failed), "seconds": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else "h200" if "H200" in result["gpu"] else "gpu"
    path = args.out / f"gpu_plugin_{tag}_{datetime.now(timezone.utc):%Y-%m-%d}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    for r in failed:
        print("FAILED", {k: r[k] for k in ("d", "dtype", "mask", "lengths", "rel_err", "nonfinite")})
    worst = {t: max((r["rel_err"] for r in rows if r["dtype"] == t), default=None) for t in TORCH}
    print(f"{len(rows) - len(failed)}/{len(rows)} checks passed; worst rel err {worst}")
    if "timing" in result:
        t = result["timing"]
        print(f"dlrm-v3 B=16 bf16: plugin {t['plugin_ms']:.3f} ms, Triton op {t['triton_op_ms']:.3f} ms "
              f"(x{t['plugin_over_triton']:.2f}); plugin {t['plugin_tflops']:.0f} TFLOP/s = "
              f"{t['plugin_over_matmul_rate']:.3f} of the bf16 matmul ({t['matmul_bf16_tflops']:.0f} TFLOP/s)")
    print(f"wrote {path} ({result['summary']['seconds']:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
