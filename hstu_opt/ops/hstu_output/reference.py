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
    y = torch.cat([u, a, u * layer_norm(a, norm_weight, norm_bias, eps)], dim=-1)  # [..., 3*H*dv]
    if dropout > 0:
        y = F.dropout(y, p=dropout, training=True)
    return x + y @ output_weight.to(y.dtype)
