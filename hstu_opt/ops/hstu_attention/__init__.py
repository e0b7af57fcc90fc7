"""hstu_attention: pointwise SiLU attention with the causal + target (+ contextual, + window) mask.

Three entry points, one math (reference.py):
  hstu_attention         jagged q/k/v [L, H, d] + offsets [B+1] + num_targets [B]
  hstu_attention_dense   padded q/k/v [B, n, H, d] + a [B, n, n] mask built once per batch (the exportable form)
  cached_hstu_attention  jagged new rows attend to their user's cached K/V plus themselves (M-FALCON)
  cached_hstu_attention_paged  the same, the cached K/V read in place through per-user page tables
"""

from torch import Tensor

from hstu_opt.ops._registry import Impl, OpTable

TABLE = OpTable("hstu_attention", __name__)


def hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    offsets: Tensor,
    num_targets: Tensor | None,
    *,
    max_seq_len: int,
    alpha: float,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    min_full_attn_seq_len: int = 0,
    impl: Impl = Impl.REFERENCE,
) -> Tensor:
    """q, k: [L, H, dqk]; v: [L, H, dv]; returns [L, H, dv]. `max_seq_len` is N of the 1/N scale; the mask
    (contextual rows, window, min_full_attn_seq_len) is HSTU.md's."""
    fn = TABLE.get(impl, "hstu_attention")
    return fn(q, k, v, offsets, num_targets, max_seq_len, alpha, contextual_len, max_attn_len, min_full_attn_seq_len)


def hstu_attention_dense(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    impl: Impl = Impl.REFERENCE,
) -> Tensor:
    """q, k: [B, n, H, dqk]; v: [B, n, H, dv]; mask: [B, n, n] bool (reference.attention_mask)."""
    fn = TABLE.get(impl, "hstu_attention_dense")
    return fn(q, k, v, mask, max_seq_len, alpha)


def cached_hstu_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    delta_offsets: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_offsets: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    max_delta_len: int | None = None,
    min_full_attn_seq_len: int = 0,
    impl: Impl = Impl.REFERENCE,
) -> Tensor:
    """q/k/v: the new (candidate) rows, jagged by delta_offsets; caches jagged by cache_offsets.

    Equals the target rows of hstu_attention over [cache rows][new rows] with num_targets = new rows.
    `max_delta_len` bounds the new rows per user (default N); fast kernels size their grid with it.
    """
    fn = TABLE.get(impl, "cached_hstu_attention")
    return fn(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha, contextual_len, max_attn_len,
              max_delta_len or max_seq_len, min_full_attn_seq_len)


def cached_hstu_attention_paged(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    delta_offsets: Tensor,
    k_pages: Tensor,
    v_pages: Tensor,
    page_table: Tensor,
    cache_lens: Tensor,
    *,
    max_seq_len: int,
    alpha: float,
    contextual_len: int = 0,
    max_attn_len: int = 0,
    max_delta_len: int | None = None,
    min_full_attn_seq_len: int = 0,
    impl: Impl = Impl.REFERENCE,
) -> Tensor:
    """cached_hstu_attention with each user's cache in pages: k_pages [P, page_rows, H, dqk] / v_pages
    [P, page_rows, H, dv] (one layer of a page pool), page_table [B, max_pages] (int32 page ids; entries
    past a user's pages are never read), cache_lens [B]. User b's cache row r is row r % page_rows of page
    page_table[b, r // page_rows]. Equals cached_hstu_attention over the gathered rows (reference.py)."""
    fn = TABLE.get(impl, "cached_hstu_attention_paged")
    return fn(q, k, v, delta_offsets, k_pages, v_pages, page_table, cache_lens, max_seq_len, alpha, contextual_len,
              max_attn_len, max_delta_len or max_seq_len, min_full_attn_seq_len)


from hstu_opt.ops.hstu_attention import reference as _reference  # noqa: E402,F401
