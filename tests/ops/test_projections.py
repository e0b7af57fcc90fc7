import pytest
import torch

from hstu_opt import ops
from hstu_opt.model.config import HstuConfig
from hstu_opt.model.layout import Jagged
from hstu_opt.model.stu import STULayer
from tests.conftest import TOLERANCES
from tests.ops import oracle


def _layer(D, H, dqk, dv, seed=0):
    torch.manual_seed(seed)
    cfg = HstuConfig(embedding_dim=D, num_layers=1, num_heads=H, attention_dim=dqk, linear_dim=dv, max_history_len=30,
                     max_targets=4, num_items=10, contextual_len=1, contextual_cardinality=3)
    layer = STULayer(cfg)
    with torch.no_grad():  # non-trivial norm parameters so a swapped weight/bias shows
        for name in ("input_norm_weight", "input_norm_bias", "output_norm_weight", "output_norm_bias", "uvqk_beta"):
            getattr(layer, name).normal_(0.5, 0.3)
    return cfg, layer


@pytest.mark.parametrize("D,H,dqk,dv", [(50, 1, 50, 50), (64, 2, 32, 16), (48, 3, 16, 24)])
def test_stu_layer_matches_float64_oracle(D, H, dqk, dv):
    cfg, layer = _layer(D, H, dqk, dv)
    nt = [2, 1, 3]  # lengths 7, 2, 12
    offsets = torch.tensor([0, 7, 9, 21])
    x = torch.randn(21, D)
    got, _, _ = layer(x, Jagged(offsets, torch.tensor(nt), 1))
    want = oracle.stu_layer(x, dict(layer.named_parameters()), offsets, nt, cfg.max_seq_len, H, dqk, dv, C=1)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_runs_in_float32(dtype):
    x = (torch.randn(5, 33) * 30 + 100).to(dtype)
    w, b = torch.rand(33), torch.rand(33)
    got = ops.layer_norm(x, w, b)
    assert got.dtype == dtype
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), oracle.layer_norm(x, w, b), atol=atol, rtol=rtol)


def test_uvqk_split_order_and_silu_on_u_only():
    D, H, dqk, dv = 6, 2, 3, 2
    x = torch.randn(4, D)
    W = torch.randn(D, H * (2 * dv + 2 * dqk))
    beta = torch.randn(W.shape[1])
    u, q, k, v = ops.uvqk(x, torch.ones(D), torch.zeros(D), W, beta, num_heads=H, attention_dim=dqk, linear_dim=dv)
    proj = oracle.layer_norm(x, torch.ones(D), torch.zeros(D)) @ W.double() + beta.double()
    hv, hqk = H * dv, H * dqk
    torch.testing.assert_close(u.double(), torch.nn.functional.silu(proj[:, :hv]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.reshape(4, -1).double(), proj[:, hv : 2 * hv], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.reshape(4, -1).double(), proj[:, 2 * hv : 2 * hv + hqk], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.reshape(4, -1).double(), proj[:, 2 * hv + hqk :], atol=1e-5, rtol=1e-5)


def test_uvqk_kv_equals_uvqk_k_and_v():
    D, H, dqk, dv = 6, 2, 3, 2
    x = torch.randn(4, D)
    W = torch.randn(D, H * (2 * dv + 2 * dqk))
    beta = torch.randn(W.shape[1])
    kw = dict(num_heads=H, attention_dim=dqk, linear_dim=dv)
    _, _, k, v = ops.uvqk(x, torch.ones(D), torch.zeros(D), W, beta, **kw)
    k2, v2 = ops.uvqk_kv(x, torch.ones(D), torch.zeros(D), W, beta, **kw)
    torch.testing.assert_close(k2, k)
    torch.testing.assert_close(v2, v)
    rows = torch.tensor([3, 0, 3])  # gathered rows: any order, repeats allowed
    k3, v3 = ops.uvqk_kv(x, torch.ones(D), torch.zeros(D), W, beta, rows=rows, **kw)
    torch.testing.assert_close(k3, k[rows])
    torch.testing.assert_close(v3, v[rows])
