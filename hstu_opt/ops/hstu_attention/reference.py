"""The reference HSTU attention: pure PyTorch, runs on CPU and CUDA, and *is* the spec (HSTU.md "The mask").

Every row gets an id: contextual rows 0, history rows 1, 2, ...; every target row `hi`, the id one past
the last history row (ids here are HSTU.md's shifted by one when C == 0; only differences matter). Then
    d_ij    = id_i - id_j
    mask_ij = i == j | d_ij > 0                                      causal; targets do not see each other
    window  : mask_ij &= d_ij <= max_attn_len | (min_full > 0 & id_i >= hi - min_full)
    C > 0   : mask_ij |= id_i == 0 & id_j < hi                       contextual rows see contextual + history
in that order: the window applies before the contextual rule, so it also hides the contextual rows from a
row more than max_attn_len ids after them (as generative-recommenders does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hstu_opt.ops._registry import Impl
from hstu_opt.ops.hstu_attention import TABLE


def row_ids(pos: Tensor, seq_len: Tensor, num_targets: Tensor, contextual_len: int) -> tuple[Tensor, Tensor]:
    """Per-row mask id and `hi` (the id every target row shares) from the row's position in its sequence
    (broadcasting ints): contextual rows 0, history rows 1.., targets hi = first target's position - C + 1."""
    hist_end = seq_len - num_targets  # index of the first target row
    ids = torch.where(pos < contextual_len, 0, torch.minimum(pos, hist_end) - contextual_len + 1)
    return ids, hist_end - contextual_len + 1


def attention_mask(ids: Tensor, hi: Tensor, valid: Tensor, max_attn_len: int, min_full_attn_seq_len: int = 0) -> Tensor:
    """ids, valid: [B, n]; hi: [B, 1] (row_ids) -> mask [B, n, n] (bool), HSTU.md's pseudo-code in its order."""
    n = ids.shape[-1]
    ar = torch.arange(n, device=ids.device)
    id_i, id_j = ids[:, :, None], ids[:, None, :]
    d = id_i - id_j
    mask = (ar[:, None] == ar[None, :])[None] | (d > 0)
    if max_attn_len > 0:
        within = d <= max_attn_len
        if min_full_attn_seq_len > 0:
            within = within | (id_i >= (hi - min_full_attn_seq_len)[:, :, None])
        mask = mask & within
    mask = mask | ((id_i == 0) & (id_j < hi[:, :, None]))  # contextual rows (no row has id 0 when C == 0)
    return mask & valid[:, :, None] & valid[:, None, :]


@TABLE.register(Impl.REFERENCE)
def hstu_attention_dense(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, max_seq_len: int, alpha: float) -> Tensor:
    # Written with MatMul + Transpose (not einsum) so the ONNX graph is plain MatMuls that
    # quantizers and engine builders know.
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qt = q.to(compute).transpose(1, 2)  # [B, H, n, dqk]
    kt = k.to(compute).permute(0, 2, 3, 1)  # [B, H, dqk, n]
    vt = v.to(compute).transpose(1, 2)  # [B, H, n, dv]
    weights = F.silu(torch.matmul(qt, kt) * alpha)  # [B, H, n, n]
    # The 1/N scale rides on the mask: one multiply on the big tensor instead of a divide and a select
    # (a broadcast select over [B, H, n, n] was a third of onnxruntime's time).
    scaled_mask = mask[:, None].to(compute) / max_seq_len  # [B, 1, n, n]
    return torch.matmul(weights * scaled_mask, vt).transpose(1, 2).to(q.dtype)  # [B, n, H, dv]


def _jagged_index(offsets: Tensor, num_rows: int) -> tuple[Tensor, Tensor, Tensor]:
    """(user of each row [L], position of each row in its sequence [L], lengths [B])."""
    lengths = offsets[1:] - offsets[:-1]
    user = torch.repeat_interleave(torch.arange(lengths.numel(), device=offsets.device), lengths, output_size=num_rows)
    pos = torch.arange(user.numel(), device=offsets.device) - offsets[user]
    return user, pos, lengths


def _check_jagged(q: Tensor, offsets: Tensor, num_targets: Tensor, contextual_len: int) -> None:
    if torch.compiler.is_compiling():  # host syncs; a compiled engine checks its requests before it runs
        return
    lengths = offsets[1:] - offsets[:-1]
    assert int(offsets[0]) == 0 and int(offsets[-1]) == q.shape[0], "offsets must start at 0 and end at L"
    assert bool((lengths >= 0).all()), "offsets must be non-decreasing"
    assert bool((lengths - num_targets >= contextual_len).all() | (lengths == 0).all()), (
        "every non-empty sequence needs at least contextual_len non-target rows"
    )


@TABLE.register(Impl.REFERENCE)
def hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, offsets: Tensor, num_targets: Tensor | None, max_seq_len: int, alpha: float,
    contextual_len: int, max_attn_len: int, min_full_attn_seq_len: int = 0,
) -> Tensor:
    user, pos, lengths = _jagged_index(offsets, q.shape[0])
    B = lengths.numel()
    if num_targets is None:
        num_targets = torch.zeros_like(lengths)
    _check_jagged(q, offsets, num_targets, contextual_len)
    if torch.compiler.is_compiling():  # pad to a bound known from shapes (no host sync, no recompiles)
        n = torch.sym_min(max_seq_len, q.shape[0])
    else:
        n = int(lengths.max()) if B > 0 and q.shape[0] > 0 else 0
    if n == 0:
        return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])

    def pad(t: Tensor) -> Tensor:
        out = t.new_zeros(B, n, *t.shape[1:])
        out[user, pos] = t
        return out

    slot = torch.arange(n, device=q.device)[None, :]  # [1, n]
    ids, hi = row_ids(slot, lengths[:, None], num_targets[:, None], contextual_len)
    mask = attention_mask(ids, hi, slot < lengths[:, None], max_attn_len, min_full_attn_seq_len)
    dense = hstu_attention_dense(pad(q), pad(k), pad(v), mask, max_seq_len, alpha)
    return dense[user, pos]


@TABLE.register(Impl.REFERENCE)
def cached_hstu_attention(
    q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_cache: Tensor, v_cache: Tensor, cache_offsets: Tensor,
    max_seq_len: int, alpha: float, contextual_len: int, max_attn_len: int, max_delta_len: int,
    min_full_attn_seq_len: int = 0,
) -> Tensor:
    del max_delta_len  # only sizes fast kernels' grids
    # The definition: interleave [cache rows][new rows] per user, run the full attention with the new
    # rows as targets, keep the new rows. Cached rows need no query (their outputs are dropped).
    full_offsets = cache_offsets + delta_offsets
    c_user, c_pos, _ = _jagged_index(cache_offsets, k_cache.shape[0])
    d_user, d_pos, d_len = _jagged_index(delta_offsets, q.shape[0])
    c_rows = full_offsets[c_user] + c_pos
    d_rows = full_offsets[d_user] + (cache_offsets[d_user + 1] - cache_offsets[d_user]) + d_pos

    def interleave(cached: Tensor | None, new: Tensor) -> Tensor:
        out = new.new_zeros(q.shape[0] + k_cache.shape[0], *new.shape[1:])  # from shapes: no host sync
        if cached is not None:
            out[c_rows] = cached.to(new.dtype)
        out[d_rows] = new
        return out

    full = hstu_attention(
        interleave(None, q), interleave(k_cache, k), interleave(v_cache, v), full_offsets, d_len,
        max_seq_len, alpha, contextual_len, max_attn_len, min_full_attn_seq_len,
    )
    return full[d_rows]


def paged_rows(page_table: Tensor, cache_lens: Tensor, page_rows: int) -> tuple[Tensor, Tensor]:
    """(pool row of every cached row, users jagged [B+1]) from page tables: user b's row r lives at
    page_table[b, r // page_rows] * page_rows + r % page_rows of the pool's [pages * page_rows] rows."""
    cache_offsets = F.pad(cache_lens.to(torch.int64).cumsum(0), (1, 0))
    user, pos, _ = _jagged_index(cache_offsets, int(cache_offsets[-1]))
    pages = page_table.to(torch.int64)[user, pos // page_rows]
    return pages * page_rows + pos % page_rows, cache_offsets


@TABLE.register(Impl.REFERENCE)
def cached_hstu_attention_paged(
    q: Tensor, k: Tensor, v: Tensor, delta_offsets: Tensor, k_pages: Tensor, v_pages: Tensor, page_table: Tensor,
    cache_lens: Tensor, max_seq_len: int, alpha: float, contextual_len: int, max_attn_len: int, max_delta_len: int,
    min_full_attn_seq_len: int = 0,
) -> Tensor:
    # The definition: gather each user's cache rows out of the pages, then the contiguous cached attention.
    rows, cache_offsets = paged_rows(page_table, cache_lens, k_pages.shape[1])
    k_cache, v_cache = k_pages.flatten(0, 1)[rows], v_pages.flatten(0, 1)[rows]
    return cached_hstu_attention(q, k, v, delta_offsets, k_cache, v_cache, cache_offsets, max_seq_len, alpha,
                                 contextual_len, max_attn_len, max_delta_len, min_full_attn_seq_len)
