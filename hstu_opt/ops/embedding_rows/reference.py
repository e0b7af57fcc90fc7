import torch
from torch import Tensor

from hstu_opt.ops._registry import Impl
from hstu_opt.ops.embedding_rows import TABLE


@TABLE.register(Impl.REFERENCE)
def embedding_rows(indices: Tensor, scales: Tensor, tables: list[Tensor]) -> Tensor:
    out = torch.zeros(indices.shape[0], tables[0].shape[1], dtype=torch.float32, device=indices.device)
    for t, table in enumerate(tables):
        out += scales[:, t, None] * table[indices[:, t]].float()
    return out.to(tables[0].dtype)
