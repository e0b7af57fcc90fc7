"""An independent float64 oracle: HSTU.md's formulas as plain per-sequence, per-element loops.

It exists to check the reference ops (which are vectorized and mask-based); it is deliberately
written from the spec text, not from the reference code.
"""

import math

import torch


def mask_ij(i, j, n, num_targets, C, max_attn_len, min_full_attn_seq_len=0):
    """HSTU.md "The mask", line by line (its ids, unshifted)."""
    T = num_targets
    hi = n - T - C + 1 if C > 0 else n - T

    def ident(r):
        r_id = max(r - C + 1, 0) if C > 0 else r
        return min(r_id, hi)

    id_i, id_j = ident(i), ident(j)
    d = id_i - id_j
    m = (i == j) or (d > 0)
    if max_attn_len > 0:
        m = m and (d <= max_attn_len or (min_full_attn_seq_len > 0 and id_i >= hi - min_full_attn_seq_len))
    if C > 0:
        m = m or (id_i == 0 and id_j < hi)
    return m


def user_mask(n, num_targets, C, max_attn_len, min_full_attn_seq_len=0):
    """[n, n] bool: mask_ij for every pair of one user's rows."""
    return torch.tensor([[mask_ij(i, j, n, num_targets, C, max_attn_len, min_full_attn_seq_len) for j in range(n)]
                         for i in range(n)], dtype=torch.bool).reshape(n, n)


def attention(q, k, v, offsets, num_targets, N, alpha, C=0, max_attn_len=0, min_full_attn_seq_len=0):
    """q,k: [L, H, dqk]; v: [L, H, dv] -> [L, H, dv] in float64: a_i = sum_j mask_ij SiLU(alpha <q_i, k_j>) / N v_j."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    for b in range(len(offsets) - 1):
        s, e = int(offsets[b]), int(offsets[b + 1])
        n, nt = e - s, int(num_targets[b]) if num_targets is not None else 0
        if n == 0:
            continue
        m = user_mask(n, nt, C, max_attn_len, min_full_attn_seq_len).double()  # [n, n]
        dots = torch.einsum("ihd,jhd->hij", q[s:e], k[s:e]) * alpha  # [H, n, n]
        w = dots * torch.sigmoid(dots) / N * m
        out[s:e] = torch.einsum("hij,jhd->ihd", w, v[s:e])
    return out


def layer_norm(x, w, b, eps=1e-6):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w.double() + b.double()


def stu_layer(x, p, offsets, num_targets, N, H, dqk, dv, C=0, max_attn_len=0, alpha=None, min_full_attn_seq_len=0):
    """One STU layer in float64 from HSTU.md; p: dict of the layer's parameters."""
    alpha = alpha if alpha is not None else 1 / math.sqrt(dqk)
    n = layer_norm(x, p["input_norm_weight"], p["input_norm_bias"])
    uvqk = n @ p["uvqk_weight"].double() + p["uvqk_beta"].double()
    u, v, q, k = torch.split(uvqk, [H * dv, H * dv, H * dqk, H * dqk], dim=-1)
    u = u * torch.sigmoid(u)
    a = attention(q.reshape(-1, H, dqk), k.reshape(-1, H, dqk), v.reshape(-1, H, dv), offsets, num_targets, N, alpha, C,
                  max_attn_len, min_full_attn_seq_len).reshape(-1, H * dv)
    y = torch.cat([u, a, u * layer_norm(a, p["output_norm_weight"], p["output_norm_bias"])], -1)
    return x.double() + y @ p["output_weight"].double()
