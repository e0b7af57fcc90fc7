"""embedding_rows: out[r] = sum_t scales[r, t] * tables[t][indices[r, t]], in float32, returned in the
first table's dtype. The input encoders' gather-and-sum (item, rating, contextual, position and time
embeddings of each row) with the per-row index and weight work done once per row, not per element."""

from torch import Tensor

from hstu_opt.ops._registry import Impl, OpTable

TABLE = OpTable("embedding_rows", __name__)


def embedding_rows(indices: Tensor, scales: Tensor, tables: list[Tensor], *, impl: Impl = Impl.REFERENCE) -> Tensor:
    """indices: [L, T] int64 rows of each of the T tables ([n_t, D] each, one dtype); scales: [L, T] float32
    (a zero weight skips that table's row)."""
    return TABLE.get(impl, "embedding_rows")(indices, scales, tables)


from hstu_opt.ops.embedding_rows import reference as _reference  # noqa: E402,F401
