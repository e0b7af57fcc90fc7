"""uvqk: input LayerNorm + UVQK projection + split + SiLU(u)."""

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


from hstu_opt.ops.uvqk import reference as _reference  # noqa: E402,F401
