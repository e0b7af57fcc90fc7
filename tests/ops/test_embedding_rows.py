"""embedding_rows (the encoders' per-row gather-and-sum): the Triton kernel in Triton's interpreter
against the reference op, and the encoder's row path against its reference sum."""

import inspect

import pytest
import torch

from tests.ops.triton_interpreter import interpret_without_gpu, needs_triton  # noqa: E402,F401 (before the kernels)

pytestmark = needs_triton

from hstu_opt import ops  # noqa: E402
from hstu_opt.model import HstuConfig, HstuModel  # noqa: E402
from hstu_opt.model.layout import Jagged  # noqa: E402
from hstu_opt.ops import Impl  # noqa: E402
from tests.conftest import TOLERANCES  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("L,D,sizes", [(1, 16, [3]), (37, 50, [100, 6, 9]), (70, 64, [40, 2, 5, 7, 11])])
def test_triton_matches_reference(dtype, L, D, sizes):
    """Odd row counts and widths, one to five tables, zero weights (their rows skipped) and repeated rows."""
    g = torch.Generator().manual_seed(L + D)
    tables = [torch.randn(n, D, generator=g).to(dtype) for n in sizes]
    indices = torch.stack([torch.randint(0, n, (L,), generator=g) for n in sizes], 1)
    scales = torch.randn(L, len(sizes), generator=g) * (torch.rand(L, len(sizes), generator=g) > 0.3)
    want = ops.embedding_rows(indices, scales, [t.float() for t in tables])
    got = ops.embedding_rows(indices, scales, tables, impl=Impl.TRITON)
    atol, rtol = TOLERANCES[dtype]
    assert got.shape == (L, D) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_encoder_rows_match_the_reference_encoder(C, dtype):
    """The encoder with a Triton embedding_rows (one gather-and-sum per row) against its reference sum, on
    jagged rows with contextual rows, targets and a length-1 sequence; under autograd the reference runs."""
    cfg = HstuConfig(embedding_dim=48, num_layers=1, num_heads=2, attention_dim=8, linear_dim=8, max_history_len=40,
                     max_targets=8, num_items=200, contextual_len=C, contextual_cardinality=30)
    enc = HstuModel(cfg).encoder.to(dtype)
    g = torch.Generator().manual_seed(C)
    offsets, nt = torch.tensor([0, 1, 20, 41]), torch.tensor([0, 3, 5])
    L = 41
    ids = torch.randint(1, 200, (L,), generator=g)
    ratings = torch.randint(0, 6, (L,), generator=g)
    ts = torch.randint(0, 10 ** 6, (L,), generator=g)
    qt = torch.full((3,), 2 * 10 ** 6)
    layout = Jagged(offsets, nt, C, num_rows=L)
    ids = torch.where(layout.pos < C, ids % 30 + 1, ids)  # contextual rows carry a contextual feature id
    with torch.no_grad():
        want = enc(ids, ratings, ts, qt, layout)
        got = enc(ids, ratings, ts, qt, layout, Impl.TRITON)
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    calls = []
    real = ops.embedding_rows
    import hstu_opt.model.encoders as encoders
    encoders.ops.embedding_rows = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        enc(ids, ratings, ts, qt, layout, {"embedding_rows": "triton"})  # grad enabled, weights require grad
        with torch.no_grad():
            enc(ids, ratings, ts, qt, layout, {"embedding_rows": "triton"})
    finally:
        encoders.ops.embedding_rows = real
    assert calls == [1]


@pytest.mark.parametrize("C", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_candidate_rows_equal_a_full_forwards_candidate_rows(C, dtype):
    """encoder.candidates with a Triton embedding_rows (what a cache hit scores) gives, bit for bit, the rows
    the encoder's jagged path gives the same candidates in a full forward (targets at the query time), and
    the reference candidates within tolerance; its weights survive the model's cast to 16 bits."""
    cfg = HstuConfig(embedding_dim=48, num_layers=1, num_heads=2, attention_dim=8, linear_dim=8, max_history_len=40,
                     max_targets=8, num_items=200, contextual_len=C, contextual_cardinality=30)
    enc = HstuModel(cfg).encoder.to(dtype)
    g = torch.Generator().manual_seed(7 + C)
    hist, n_cand = 9, 6
    L = C + hist + n_cand
    cands = torch.randint(1, 200, (n_cand,), generator=g)
    ids = torch.cat([torch.randint(1, 30, (C,), generator=g), torch.randint(1, 200, (hist,), generator=g), cands])
    ratings = torch.cat([torch.zeros(C, dtype=torch.int64), torch.randint(1, 6, (hist,), generator=g),
                         torch.zeros(n_cand, dtype=torch.int64)])
    qt = torch.tensor([10 ** 6])
    ts = torch.cat([torch.zeros(C, dtype=torch.int64), torch.randint(0, 10 ** 6, (hist,), generator=g), qt.repeat(n_cand)])
    layout = Jagged(torch.tensor([0, L]), torch.tensor([n_cand]), C, num_rows=L)
    with torch.no_grad():
        full = enc(ids, ratings, ts, qt, layout, Impl.TRITON)[-n_cand:]
        got = enc.candidates(cands, Impl.TRITON)
        want = enc.candidates(cands)
    assert got.dtype == dtype and torch.equal(got, full)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    assert enc.cand_weight_bits.view(torch.float32)[0].item() == torch.tensor(cfg.embedding_dim ** 0.5).item()


def test_real_and_fake_signatures_agree():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu_opt.ops.embedding_rows.triton import embedding_rows_triton

    real = [a.name for a in torch.ops.hstu_opt.embedding_rows_triton.default._schema.arguments]
    assert real == list(inspect.signature(embedding_rows_triton._abstract_fn).parameters)
    with FakeTensorMode():
        out = embedding_rows_triton(torch.empty(9, 2, dtype=torch.int64), torch.empty(9, 2),
                                    [torch.empty(5, 24, dtype=torch.float16), torch.empty(3, 24, dtype=torch.float16)])
        assert out.shape == (9, 24) and out.dtype == torch.float16
