"""Which Triton op goes wrong under torch.compile on the GPU (NaN outputs seen in GPU run 8)? Each op
alone, eager vs torch.compile, realistic shapes, strided and contiguous inputs.

    python benchmarks/compile_debug.py OUT.json

Result before the fix (results/compile_debug_h200_2026-11-29.json): both attention triton_ops gave NaN
in most rows under torch.compile with or without the tanh SiLU; uvqk and hstu_output were exact to a
bf16 ulp. After (results/compile_debug_h200_2026-11-29_after.json): the attention runs as an opaque
custom op under torch.compile (hstu_attention/triton.py)."""
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

_blocks = tri._blocks
rows = []
for fast in (True,):
  tri._blocks = lambda *a: _blocks(*a) | ({} if fast else {"FAST": False})  # noqa: E731
  for name, fn in list(cases.items())[:4]:
    want = fn(proj).float()
    for mode in ("default",):
        torch._dynamo.reset()
        try:
            c = torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)
            for _ in range(3):
                got = c(proj).float().clone()
            bad = got.isnan().reshape(got.shape[0], -1).any(1).nonzero().flatten()
            rows.append({"case": name, "fast": fast, "nan": int(got.isnan().sum()), "bad_rows": bad[:5].tolist(), "n_bad_rows": len(bad),
                         "max_abs_diff": float((got - want).abs().nan_to_num(1e9).max()), "want_nan": int(want.isnan().sum())})
        except Exception as exc:
            rows.append({"case": name, "mode": mode, "error": repr(exc)[:300]})
        print(rows[-1], flush=True)
Path(sys.argv[1]).write_text(json.dumps(rows, indent=1))
