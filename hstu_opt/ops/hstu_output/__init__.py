"""hstu_output: x + concat[u, a, u * LN(a)] @ W_out."""

from torch import Tensor

from hstu_opt.ops._registry import Impl, OpTable

TABLE = OpTable("hstu_output", __name__)


def hstu_output(
    u: Tensor,
    a: Tensor,
    x: Tensor,
    norm_weight: Tensor,
    norm_bias: Tensor,
    output_weight: Tensor,
    *,
    eps: float = 1e-6,
    dropout: float = 0.0,
    impl: Impl = Impl.REFERENCE,
) -> Tensor:
    """u, a: [..., H*dv]; x: [..., D]; output_weight: [3*H*dv, D]. `dropout` is for training only."""
    return TABLE.get(impl, "hstu_output")(u, a, x, norm_weight, norm_bias, output_weight, eps, dropout)


from hstu_opt.ops.hstu_output import reference as _reference  # noqa: E402,F401
