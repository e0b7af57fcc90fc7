"""layer_norm: LayerNorm over the last dim, computed in float32, returned in the input dtype."""

from torch import Tensor

from hstu_opt.ops._registry import Impl, OpTable

TABLE = OpTable("layer_norm", __name__)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-6, *, impl: Impl = Impl.REFERENCE) -> Tensor:
    return TABLE.get(impl, "layer_norm")(x, weight, bias, eps)


from hstu_opt.ops.layer_norm import reference as _reference  # noqa: E402,F401  (registers itself)
