import torch.nn.functional as F
from torch import Tensor

from hstu_opt.ops._registry import Impl
from hstu_opt.ops.layer_norm import TABLE


@TABLE.register(Impl.REFERENCE)
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6) -> Tensor:
    # HSTU.md: norms run in float32 even when the layer runs in bf16/fp16.
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)
    return y.to(x.dtype)
