"""uvqk: input LayerNorm + UVQK projection + split + SiLU(u)."""

import torch
from torch import Tensor

from hstu_opt.ops._registry import Impl, OpTable

TABLE = OpTable("uvqk", __name__)


def uvqk(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    uvqk_weight: Tensor,
    uvqk_bias: Tensor,
    *,
    num_heads: int,
    attention_dim: int,
    linear_dim: int,
    eps: float = 1e-6,
    impl: Impl = Impl.REFERENCE,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: [..., D] -> u [..., H*dv] (after SiLU), q [..., H, dqk], k [..., H, dqk], v [..., H, dv]."""
    fn = TABLE.get(impl, "uvqk")
    return fn(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps)


def kv_columns(uvqk_weight: Tensor, uvqk_bias: Tensor, num_heads: int, attention_dim: int,
               linear_dim: int) -> tuple[Tensor, Tensor]:
    """The [v | k] columns of the [u | v | q | k] projection (weight [D, H*dv + H*dqk], bias)."""
    hv, hqk = num_heads * linear_dim, num_heads * attention_dim
    cols = [slice(hv, 2 * hv), slice(2 * hv + hqk, 2 * hv + 2 * hqk)]
    return (torch.cat([uvqk_weight[:, c] for c in cols], dim=1), torch.cat([uvqk_bias[c] for c in cols]))


def split_uvqk(proj: Tensor, lead: tuple, num_heads: int, attention_dim: int,
               linear_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A fused projection's [u | v | q | k] rows [R, N] -> (u [*lead, H*dv], q, k [*lead, H, dqk], v
    [*lead, H, dv]): strided views, no copies (the fast implementations' common output step)."""
    hv, hqk = num_heads * linear_dim, num_heads * attention_dim
    u, v, q, k = torch.split(proj, [hv, hv, hqk, hqk], dim=-1)
    return (u.reshape(*lead, hv), q.reshape(*lead, num_heads, attention_dim),
            k.reshape(*lead, num_heads, attention_dim), v.reshape(*lead, num_heads, linear_dim))


def split_kv(proj: Tensor, lead: tuple, num_heads: int, attention_dim: int, linear_dim: int) -> tuple[Tensor, Tensor]:
    """uvqk_kv's [v | k] rows [R, N] -> (k [*lead, H, dqk], v [*lead, H, dv]), views."""
    v, k = torch.split(proj, [num_heads * linear_dim, num_heads * attention_dim], dim=-1)
    return k.reshape(*lead, num_heads, attention_dim), v.reshape(*lead, num_heads, linear_dim)


def uvqk_kv(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    uvqk_weight: Tensor,
    uvqk_bias: Tensor,
    *,
    num_heads: int,
    attention_dim: int,
    linear_dim: int,
    eps: float = 1e-6,
    rows: Tensor | None = None,
    impl: Impl = Impl.REFERENCE,
) -> tuple[Tensor, Tensor]:
    """Only k [..., H, dqk] and v [..., H, dv] of uvqk (half its columns): rows whose u and q nothing
    reads, such as the history rows of the last layer when only the candidates are scored.
    rows (int [R], for a [L, D] x): project x.index_select(0, rows), which fast kernels gather as they
    load instead of copying first; k and v are then [R, H, d]."""
    fn = TABLE.get(impl, "uvqk_kv")
    return fn(x, norm_weight, norm_bias, uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim, eps, rows)


from hstu_opt.ops.uvqk import reference as _reference  # noqa: E402,F401
