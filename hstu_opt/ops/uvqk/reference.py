import torch
import torch.nn.functional as F
from torch import Tensor

from hstu_opt.ops._registry import Impl
from hstu_opt.ops.layer_norm import layer_norm
from hstu_opt.ops.uvqk import TABLE, kv_columns


@TABLE.register(Impl.REFERENCE)
def uvqk(
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    uvqk_weight: Tensor,  # [D, H*(2*dv + 2*dqk)]
    uvqk_bias: Tensor,
    num_heads: int,
    attention_dim: int,
    linear_dim: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = layer_norm(x, norm_weight, norm_bias, eps)
    # matmul + add rather than addmm: a quantized MatMul fuses into onnxruntime's MatMulIntegerToFloat with
    # the add folded in, while a Gemm with a float bias stays dequantize + float Gemm (and TensorRT rejects
    # the int32 bias that onnxruntime's QGemm would need).
    proj = n.reshape(-1, n.shape[-1]) @ uvqk_weight.to(n.dtype) + uvqk_bias.to(n.dtype)
    proj = proj.reshape(*x.shape[:-1], proj.shape[-1])
    hv, hqk = num_heads * linear_dim, num_heads * attention_dim
    u, v, q, k = torch.split(proj, [hv, hv, hqk, hqk], dim=-1)
    lead = x.shape[:-1]
    return (
        F.silu(u),
        q.reshape(*lead, num_heads, attention_dim),
        k.reshape(*lead, num_heads, attention_dim),
        v.reshape(*lead, num_heads, linear_dim),
    )


@TABLE.register(Impl.REFERENCE)
def uvqk_kv(x: Tensor, norm_weight: Tensor, norm_bias: Tensor, uvqk_weight: Tensor, uvqk_bias: Tensor, num_heads: int,
            attention_dim: int, linear_dim: int, eps: float, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if rows is not None:
        x = x.index_select(0, rows)
    n = layer_norm(x, norm_weight, norm_bias, eps)
    w, b = kv_columns(uvqk_weight, uvqk_bias, num_heads, attention_dim, linear_dim)
    proj = n.reshape(-1, n.shape[-1]) @ w.to(n.dtype) + b.to(n.dtype)
    v, k = torch.split(proj.reshape(*x.shape[:-1], proj.shape[-1]), [num_heads * linear_dim, num_heads * attention_dim], -1)
    lead = x.shape[:-1]
    return k.reshape(*lead, num_heads, attention_dim), v.reshape(*lead, num_heads, linear_dim)
