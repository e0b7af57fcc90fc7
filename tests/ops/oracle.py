"""An independent float64 oracle: HSTU.md's formulas as plain per-sequence, per-element loops.

It exists to check the reference ops (which are vectorized and mask-based); it is deliberately
written from the spec text, not from the reference code.
"""

import math

import torch


def mask_ij(i, j, n, num_targets, C, max_attn_len):
    hist_end = n - num_targets

    def ident(r):
        if r < C:
            return 0
        return min(r, hist_end) - C + 1

    if i == j:
        return True
    if i < C:  # contextual rows see every contextual and history row, not the targets
        return j < hist_end
    ii, jj = ident(i), ident(j)
    if ii <= jj:
        return False
    if max_attn_len and jj != 0 and ii - jj > max_attn_len:
        return False
    return True


def attention(q, k, v, offsets, num_targets, N, alpha, C=0, max_attn_len=0):
    """q,k: [L, H, dqk]; v: [L, H, dv] -> [L, H, dv] in float64."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for b in range(len(offsets) - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n, nt = e - s, int(num_targets[b]) if num_targets is not None else 0
        for i in range(n):
            for j in range(n):
                if not mask_ij(i, j, n, nt, C, max_attn_len):
                    continue
                dot = (q[s + i] * k[s + j]).sum(-1) * alpha  # [H]
                w = dot * torch.sigmoid(dot) / N
                out[s + i] += w[:, None] * v[s + j]
    return out


def layer_norm(x, w, b, eps=1e-6):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.double() + b.double()


def stu_layer(x, p, offsets, num_targets, N, H, dqk, dv, C=0, max_attn_len=0, alpha=None):
    """One STU layer in float64 from HSTU.md; p: dict of the layer's parameters."""
    alpha = alpha if alpha is not None else 1 / math.sqrt(dqk)
    n = layer_norm(x, p["input_norm_weight"], p["input_norm_bias"])
    uvqk = n @ p["uvqk_weight"].double() + p["uvqk_beta"].double()
    u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
    u = u * torch.sigmoid(u)
    a = attention(q.reshape(-1, H, dqk), k.reshape(-1, H, dqk), v.reshape(-1, H, dv), offsets, num_targets, N, alpha, C,
                  max_attn_len).reshape(-1, H * dv)
    y = torch.cat([u, a, u * layer_norm(a, p["output_norm_weight"], p["output_norm_bias"])], -1)
    return x.double() + y @ p["output_weight"].double()
