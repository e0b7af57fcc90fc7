import torch
import torch.nn.functional as F
from torch import Tensor

from hstu_opt.ops._registry import Impl
from hstu_opt.ops.hstu_output import TABLE
from hstu_opt.ops.layer_norm import layer_norm


@TABLE.register(Impl.REFERENCE)
def hstu_output(
    u: Tensor, a: Tensor, x: Tensor, norm_weight: Tensor, norm_bias: Tensor, output_weight: Tensor, eps: float, dropout: float
) -> Tensor:
    parts = [u, a, u * layer_norm(a, norm_weight, norm_bias, eps)]  # concat of these is y [..., 3*H*dv]
    if dropout > 0:
        parts = list(F.dropout(torch.cat(parts, dim=-1), p=dropout, training=True).chunk(3, dim=-1))
    # y @ W_out as three GEMMs over W_out's row blocks: the same sum without materializing the concat, and
    # each block's input (u ~ 1, a ~ 1/N) gets its own scale when the graph is quantized (a quantized MatMul
    # becomes onnxruntime's MatMulIntegerToFloat). Slices, not chunk: the exporter folds a Slice of a weight
    # into an initializer, a Split it does not.
    hv = u.shape[-1]
    w = output_weight.to(u.dtype)
    y = sum(p.reshape(-1, hv) @ w[i * hv : (i + 1) * hv] for i, p in enumerate(parts))
    return x + y.reshape(x.shape)
