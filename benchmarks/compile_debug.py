"""Why the `compiled` engine first gave NaN on the H200: each Triton op alone, eager vs torch.compile
with the eager, aot_eager and inductor backends, realistic shapes, strided and contiguous inputs.

    python benchmarks/compile_debug.py OUT.json

Findings (results/compile_debug_h200_2026-11-29*.json, torch 2.11.0+cu130, triton 3.6.0):
- uvqk and hstu_output under inductor: exact to one bf16 ulp; both attention kernels: NaN in most rows
  (1860 of 2000), with or without the tanh SiLU, also when wrapped in an opaque custom op; under the
  eager and aot_eager backends bit-identical to eager. So it was Inductor's part.
- Cause (from TORCH_LOGS=output_code): Inductor types a kernel's Python-float arguments fp64 (eager
  Triton: fp32), so alpha * s ran in fp64 and fed the fp32 tanh asm and the bf16 casts. Fix: the
  kernels cast alpha and 1/N to fp32; after it the engine matches eager (results/gpu_hstu_*_run10.json).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hstu_opt import ops  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
B, n, H, d, D = 2, 1000, 4, 128, 512
L = B * n
offsets = torch.arange(B + 1, device=dev) * n
nt = torch.full((B,), 50, device=dev)
proj = torch.randn(L, 4 * H * d, device=dev, dtype=dt)
x = torch.randn(L, D, device=dev, dtype=dt)
W = torch.randn(D, 4 * H * d, device=dev, dtype=dt) * D ** -0.5
Wo = torch.randn(3 * H * d, D, device=dev, dtype=dt) * (3 * H * d) ** -0.5
g, b = torch.ones(D, device=dev), torch.zeros(D, device=dev)
g2, b2 = torch.ones(H * d, device=dev), torch.zeros(H * d, device=dev)
kw = dict(max_seq_len=1024, alpha=d ** -0.5, impl=Impl.TRITON)


def views(p):
    u, v, q, k = torch.split(p, [H * d] * 4, dim=1)
    return q.reshape(L, H, d), k.reshape(L, H, d), v.reshape(L, H, d)


cases = {
    "attn contiguous": lambda p: ops.hstu_attention(*(t.contiguous() for t in views(p)), offsets, nt, **kw),
    "attn strided views": lambda p: ops.hstu_attention(*views(p), offsets, nt, **kw),
    "attn after pointwise": lambda p: ops.hstu_attention(*views(p * 1.5 + 0.1), offsets, nt, **kw),
    "cached": lambda p: ops.cached_hstu_attention(
        *(t[: B * 100] for t in views(p)), torch.arange(B + 1, device=dev) * 100,
        *(t[B * 100: B * 900] for t in views(p)[1:]), torch.arange(B + 1, device=dev) * 800, max_delta_len=100, **kw),
    "uvqk": lambda p: ops.uvqk(x, g, b, W, torch.zeros(4 * H * d, device=dev, dtype=dt), num_heads=H,
                               attention_dim=d, linear_dim=d, impl=Impl.TRITON)[1],
    "hstu_output": lambda p: ops.hstu_output(p[:, :H * d], p[:, H * d:2 * H * d], x, g2, b2, Wo, impl=Impl.TRITON),
}
import importlib  # noqa: E402

tri = importlib.import_module("hstu_opt.ops.hstu_attention.triton")
rows = []
q0, k0, v0 = (t.contiguous() for t in views(proj))
want = tri.hstu_attention_triton(q0, k0, v0, offsets, nt, 1024, d ** -0.5, 0, 0).float()
got = tri.hstu_attention_opaque(q0, k0, v0, offsets, nt, 1024, d ** -0.5, 0, 0).float()
rows.append({"case": "opaque op called eagerly", "nan": int(got.isnan().sum()),
             "max_abs_diff": float((got - want).abs().nan_to_num(1e9).max())})
print(rows[-1], flush=True)
for name, fn in list(cases.items())[:4]:
    want = fn(proj).float()
    for backend in ("eager", "aot_eager", "inductor"):
        torch._dynamo.reset()
        try:
            got = torch.compile(fn, backend=backend, dynamic=False)(proj).float()
            bad = got.isnan().reshape(got.shape[0], -1).any(1).nonzero().flatten()
            rows.append({"case": name, "backend": backend, "nan": int(got.isnan().sum()), "n_bad_rows": len(bad),
                         "max_abs_diff": float((got - want).abs().nan_to_num(1e9).max())})
        except Exception as exc:
            rows.append({"case": name, "backend": backend, "error": repr(exc)[:300]})
        print(rows[-1], flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
