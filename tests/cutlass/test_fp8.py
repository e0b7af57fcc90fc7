"""FP8 projections on the CPU: the quantization scheme's math (ops/_fp8.py), the routing of the
`cutlass_fp8` ops (covered shapes only, the bf16 Triton op / reference otherwise, with a warning), the
custom ops' fake functions, the recipe's engine.precision, and the FP8 accuracy gate's rule
(backends/fp8_gate.py) on a fake quantization error. The kernels' numbers are checked on the H200
(benchmarks/gpu_fp8.py); their build products in test_build.py."""

from tests.ops.triton_interpreter import interpret_without_gpu  # noqa: F401 (first: test_fp8_interpreter runs Triton)

import inspect  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from hstu_opt import ops  # noqa: E402
from hstu_opt.ops import Impl, _cutlass, _fp8  # noqa: E402


@pytest.fixture
def hopper(monkeypatch):
    monkeypatch.setattr(_cutlass, "on_hopper", lambda t: True)


# --- the quantization scheme ---------------------------------------------------------------------------

def test_weight_quantization_is_per_output_column_and_transposed():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 2048, generator=g) * torch.logspace(-3, 1, 2048)  # columns of very different ranges
    wq, cs = _fp8.quantize_weight(w)
    assert wq.dtype == _fp8.E4M3 and wq.shape == (2048, 512) and wq.is_contiguous() and cs.shape == (2048,)
    assert torch.equal(wq.float().abs().amax(dim=1), torch.full((2048,), 448.0))  # each column uses the full range
    back = _fp8.dequantize(wq, cs, 0).t()
    rel = ((back - w.double()).norm(dim=0) / w.double().norm(dim=0)).max()
    assert rel < 0.04, rel  # e4m3: 3 mantissa bits, ~2-3% relative per column whatever its range


def test_row_quantization_and_zero_rows():
    y = torch.randn(7, 64).bfloat16()
    y[3] = 0
    q, s = _fp8.quantize_rows(y)
    assert q.dtype == _fp8.E4M3 and s.dtype == torch.float32 and torch.all(q[3].float() == 0)
    assert torch.all(torch.isfinite(s)) and s[3] > 0
    rel = (_fp8.dequantize(q, s, 0) - y.double()).norm() / y.double().norm()
    assert rel < 0.04


def test_reference_fp8_projections_are_close_to_bf16():
    g = torch.Generator().manual_seed(1)
    M, D, H, d = 33, 64, 2, 32
    xn = torch.randn(M, D, generator=g).bfloat16()
    w, b = (torch.randn(D, 4 * H * d, generator=g) / 8).bfloat16(), torch.randn(4 * H * d, generator=g).bfloat16()
    got = _fp8.reference_uvqk(xn, w, b, H * d)
    z = xn.double() @ w.double() + b.double()
    z[:, :H * d] = torch.nn.functional.silu(z[:, :H * d])
    assert (got - z).norm() / z.norm() < 0.05
    u, a, x = (torch.randn(M, H * d, generator=g).bfloat16() for _ in range(3))
    x = torch.randn(M, D, generator=g).bfloat16()
    nw, nb = torch.rand(H * d, generator=g) + 0.5, torch.randn(H * d, generator=g)
    wo = (torch.randn(3 * H * d, D, generator=g) / 8).bfloat16()
    got = _fp8.reference_output(u, a, x, nw, nb, wo, 1e-6)
    want = _fp8.gated_rows(u, a, nw, nb, 1e-6).double() @ wo.double() + x.double()
    assert (got - want).norm() / (want - x.double()).norm() < 0.05
    # the reference of the quantizing LN pass: one scale per row over [u | a | g]
    q, s = _fp8.reference_ln_quant(a, nw, nb, 1e-6, gate=u)
    assert q.shape == (M, 3 * H * d) and s.shape == (M,)
    assert torch.allclose(s, _fp8.gated_rows(u, a, nw, nb, 1e-6).float().abs().amax(dim=1) / 448)


def test_quantized_weights_are_cached_per_tensor_and_columns():
    _fp8.clear_weights()
    w = torch.randn(64, 256).bfloat16()
    first = _fp8.quantized_weight(w)
    assert _fp8.quantized_weight(w) is first
    cols = torch.arange(64, 128)
    sub = _fp8.quantized_weight(w, cols)
    assert torch.equal(sub[0].float(), first[0][64:128].float()) and torch.equal(sub[1], first[1][64:128])
    w.mul_(2)  # an in-place update (a new version): quantized again
    assert _fp8.quantized_weight(w) is not first
    _fp8.clear_weights()


# --- routing --------------------------------------------------------------------------------------------
@pytest.fixture
def verified(monkeypatch):
    """Coverage as it will be once an H200 run passes the FP8 op checks (what gpu_fp8.py turns on)."""
    monkeypatch.setattr(_fp8, "FP8_VERIFIED", True)


def test_fp8_switched_off_is_refused_everywhere(hopper, monkeypatch):
    """With FP8_VERIFIED off (how it shipped until H200 run 79 passed the op checks), the router sends nothing
    to the FP8 kernels."""
    monkeypatch.setattr(_fp8, "FP8_VERIFIED", False)
    x, w = torch.empty(3, 512, dtype=torch.bfloat16), torch.empty(512, 2048, dtype=torch.bfloat16)
    assert _fp8.uvqk_uncovered(x, w, 512) == _fp8.UNVERIFIED
    assert _fp8.output_uncovered(torch.empty(3, 512, dtype=torch.bfloat16), w[:, :512]) == _fp8.UNVERIFIED


@pytest.mark.parametrize("D,N,silu,dtype,wdtype,covered", [
    (512, 2048, 512, torch.bfloat16, torch.bfloat16, True),   # dlrm-v3
    (64, 128, 32, torch.bfloat16, torch.bfloat16, True),      # H=1, d=32
    (512, 2048, 512, torch.bfloat16, torch.float32, False),   # not the model's bf16 weight: no cacheable e4m3 form
    (512, 2048, 512, torch.float16, torch.bfloat16, False),
    (50, 2048, 512, torch.bfloat16, torch.bfloat16, False),
    (512, 4096, 1024, torch.bfloat16, torch.bfloat16, False),
])
def test_fp8_uvqk_covers_what_the_gpu_check_checks(hopper, verified, D, N, silu, dtype, wdtype, covered):
    reason = _fp8.uvqk_uncovered(torch.empty(3, D, dtype=dtype), torch.empty(D, N, dtype=wdtype), silu)
    assert (reason is None) == covered, reason


@pytest.mark.parametrize("hv,D,wdtype,covered", [
    (512, 512, torch.bfloat16, True), (32, 64, torch.bfloat16, True), (512, 512, torch.float32, False),
    (48, 512, torch.bfloat16, False), (512, 500, torch.bfloat16, False),
])
def test_fp8_hstu_output_covers_what_the_gpu_check_checks(hopper, verified, hv, D, wdtype, covered):
    reason = _fp8.output_uncovered(torch.empty(3, hv, dtype=torch.bfloat16), torch.empty(3 * hv, D, dtype=wdtype))
    assert (reason is None) == covered, reason


def test_uncovered_fp8_calls_run_the_reference_on_cpu_with_a_warning():
    g = torch.Generator().manual_seed(0)
    D, H, d = 64, 2, 32
    args = (torch.randn(5, D, generator=g), torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g),
            torch.randn(D, 4 * H * d, generator=g), torch.randn(4 * H * d, generator=g))
    kw = dict(num_heads=H, attention_dim=d, linear_dim=d)
    _cutlass.warn_fallback.cache_clear()
    with pytest.warns(UserWarning, match="does not cover"):
        got = ops.uvqk(*args, impl=Impl.CUTLASS_FP8, **kw)
    for a, b in zip(got, ops.uvqk(*args, **kw)):
        torch.testing.assert_close(a, b)
    with pytest.warns(UserWarning, match="does not cover"):
        k, v = ops.uvqk_kv(*args, impl=Impl.CUTLASS_FP8, **kw)
    torch.testing.assert_close(k, got[2])
    u, a, x = torch.randn(5, 64), torch.randn(5, 64), torch.randn(5, 32)
    out_args = (u, a, x, torch.rand(64) + 0.5, torch.randn(64), torch.randn(192, 32))
    with pytest.warns(UserWarning, match="does not cover"):
        got = ops.hstu_output(*out_args, impl=Impl.CUTLASS_FP8)
    torch.testing.assert_close(got, ops.hstu_output(*out_args))


def test_fp8_fake_ops_agree_with_the_real_signatures_and_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hstu_opt.ops.hstu_output.cutlass_fp8 import hstu_output_cutlass_fp8
    from hstu_opt.ops.uvqk.cutlass_fp8 import uvqk_cutlass_fp8

    for op, name in ((uvqk_cutlass_fp8, "uvqk_cutlass_fp8"), (hstu_output_cutlass_fp8, "hstu_output_cutlass_fp8")):
        real = [a.name for a in getattr(torch.ops.hstu_opt, name).default._schema.arguments]
        assert real == list(inspect.signature(op._abstract_fn).parameters)
    with FakeTensorMode():
        x, w = torch.empty(7, 64, dtype=torch.bfloat16), torch.empty(64, 256, dtype=torch.bfloat16)
        n = torch.empty(64)
        assert uvqk_cutlass_fp8(x, n, n, w, torch.empty(256), 64, 1e-6, 2, 32, 32, False).shape == (7, 256)
        rows = torch.empty(3, dtype=torch.int64)
        assert uvqk_cutlass_fp8(x, n, n, w, torch.empty(128), 0, 1e-6, 2, 32, 32, True, rows).shape == (3, 128)
        u = torch.empty(7, 64, dtype=torch.bfloat16)
        out = hstu_output_cutlass_fp8(u, u, x, n, n, torch.empty(192, 64, dtype=torch.bfloat16), 1e-6)
        assert out.shape == (7, 64) and out.dtype == torch.bfloat16


# --- recipe ---------------------------------------------------------------------------------------------

def test_engine_precision_fp8_maps_the_projections_to_cutlass_fp8():
    from pydantic import ValidationError

    from hstu_opt.backends import compiled
    from hstu_opt.recipe import EngineSection

    assert EngineSection().impl() is None and EngineSection().precision == "bf16"
    fp8 = EngineSection(precision="fp8").impl()
    assert fp8["uvqk"] == fp8["hstu_output"] == "cutlass_fp8" and fp8["hstu_attention"] == "triton"
    mixed = EngineSection(precision="fp8", ops={"uvqk": "cutlass", "hstu_attention": "triton"}).impl()
    assert mixed == {"uvqk": "cutlass_fp8", "hstu_output": "cutlass_fp8", "hstu_attention": "triton"}
    assert compiled.uses_cutlass(fp8) and compiled.uses_fp8(fp8) and not compiled.uses_fp8({"uvqk": "cutlass"})
    with pytest.raises(ValidationError):
        EngineSection(precision="fp16")


# --- the FP8 accuracy gate ------------------------------------------------------------------------------

class _FakeSet:
    """An EvalSet's shape: 600 users, 16 candidates, one task, 300 items; batches are slices."""

    def __init__(self, rng):
        self.users = np.arange(600)
        self.targets = rng.integers(1, 301, 600)
        self.cands = np.zeros((600, 16), dtype=np.int64)
        self.quality = rng.random((600, 16, 1))
        self.labels = (rng.random((600, 16, 1)) < self.quality).astype(np.float32)
        self.split = "test"

    def batches(self, batch_size):
        for start in range(0, 600, batch_size):
            sl = slice(start, start + batch_size)
            yield sl, sl


class _Scorer:
    """Informative scores; `noise` adds a fixed-seed error of that size (the fake quantization error)."""

    def __init__(self, es, noise=0.0, seed=0):
        self.es, self.noise, self.rng = es, noise, np.random.default_rng(seed)
        base = np.random.default_rng(7).normal(size=(600, 301))
        base[np.arange(600), es.targets] += 2.5
        self.items = base

    def rank(self, sl):
        p = self.es.quality[sl]
        return p + self.noise * self.rng.normal(size=p.shape) if self.noise else p

    def score_items(self, sl):
        s = self.items[sl]
        return s + 5 * self.noise * self.rng.normal(size=s.shape) if self.noise else s


def test_gate_rule_passes_a_small_error_and_fails_a_large_one():
    from hstu_opt.backends import fp8_gate

    es = _FakeSet(np.random.default_rng(0))
    same = fp8_gate.run_gate(es, _Scorer(es), _Scorer(es), ("t",), bar=0.01, resamples=200)
    assert same["passed"] and same["agreement"]["prob_max_abs_diff"] == 0
    small = fp8_gate.run_gate(es, _Scorer(es), _Scorer(es, noise=1e-3, seed=1), ("t",), bar=0.01, resamples=200)
    assert small["passed"], small["gated"]
    assert 0 < small["agreement"]["prob_max_abs_diff"] < 1e-2
    large = fp8_gate.run_gate(es, _Scorer(es), _Scorer(es, noise=0.5, seed=2), ("t",), bar=0.01, resamples=200)
    assert not large["passed"] and large["gated"]["auc_t"]["ci"][0] < -0.01
    assert "lower end is >= -1.00%" in large["rule"] and set(large) >= {"bf16", "fp8", "agreement", "gated", "split"}


def test_gate_is_skipped_off_an_h200_and_says_why(monkeypatch):
    from hstu_opt.backends import fp8_gate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = fp8_gate.fp8_gate(object(), None, ("t",), bar=0.01)
    assert report["passed"] is None and "not run" in report["skipped"] and "rule" in report


def test_covered_calls_trace_to_one_custom_op_each(hopper, verified):
    """What torch.compile sees of a covered call (traced with fake tensors: no kernel runs): the LN pass,
    quantization and GEMM are one opaque node per projection, nothing to break the graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    D, H, d = 64, 2, 32
    bf = torch.bfloat16
    x, w, b = torch.randn(5, D, dtype=bf), torch.randn(D, 4 * H * d, dtype=bf), torch.randn(4 * H * d)
    n = torch.ones(D)
    u, a, wo = torch.randn(5, H * d, dtype=bf), torch.randn(5, H * d, dtype=bf), torch.randn(3 * H * d, D, dtype=bf)

    def f(x, w, b, n, u, a, wo):
        q = ops.uvqk(x, n, n, w, b, num_heads=H, attention_dim=d, linear_dim=d, impl=Impl.CUTLASS_FP8)
        k, v = ops.uvqk_kv(x, n, n, w, b, num_heads=H, attention_dim=d, linear_dim=d, impl=Impl.CUTLASS_FP8)
        out = ops.hstu_output(u, a, x, torch.ones(H * d), torch.zeros(H * d), wo, impl=Impl.CUTLASS_FP8)
        return q[0], k, out

    gm = make_fx(f, tracing_mode="fake")(x, w, b, n, u, a, wo)
    targets = [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
    assert targets.count("hstu_opt.uvqk_cutlass_fp8.default") == 2, targets
    assert targets.count("hstu_opt.hstu_output_cutlass_fp8.default") == 1, targets



def test_build_engine_writes_the_fp8_report_and_says_it_was_skipped(micro_recipe, tmp_path, reporter, monkeypatch):
    """engine.precision fp8 on a machine without an H200: compiled/fp8_accuracy.json is written with the
    rule and `skipped` (never a pass it did not measure); the stage's key covers the gate's sections."""
    from hstu_opt.data.sequences import load_sequences
    from hstu_opt.model import HstuConfig, HstuModel
    from hstu_opt.recipe import load_recipe
    from hstu_opt.stages.base import StageContext
    from hstu_opt.stages.build_engine import BuildEngine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = load_recipe(micro_recipe)
    recipe = recipe.model_copy(update={"engine": recipe.engine.model_copy(
        update={"precision": "fp8", "backends": ("compiled",)})})
    assert {"quantize", "data", "model"} <= set(BuildEngine().key_sections(recipe))
    seqs = load_sequences(recipe.data, recipe.model.contextual_len)
    model = HstuModel(HstuConfig.from_recipe(recipe.model, num_items=seqs.num_items, num_ratings=5,
                                             contextual_cardinality=1))
    (tmp_path / "compiled").mkdir()
    report = BuildEngine._fp8_gate(StageContext(recipe, tmp_path, {}, reporter), model)
    written = json.loads((tmp_path / "compiled" / "fp8_accuracy.json").read_text())
    assert written == report and report["passed"] is None and "not run" in report["skipped"]
    assert "paired bootstrap" in report["rule"]


def test_fp8_needs_a_bf16_model_in_the_recipe(tmp_path):
    from hstu_opt.errors import RecipeError
    from hstu_opt.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nversion: '1'\nengine: {backends: [compiled], precision: fp8}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}: engine.precision fp8 needs model.dtype bfloat16 (the FP8 projections quantize "
                              "bf16 activations; a float32 model would run its projections unquantized): set "
                              "model.dtype: bfloat16, or engine.precision: bf16")
    path.write_text("name: r\nversion: '1'\nmodel: {dtype: bfloat16}\nengine: {backends: [compiled], precision: fp8}\n")
    assert load_recipe(path).engine.precision == "fp8"
    path.write_text("name: r\nversion: '1'\nengine: {backends: [compiled], ops: {uvqk: cutlass, hstu_output: triton}}\n")
    with pytest.raises(RecipeError, match=r"engine.ops uvqk: cutlass needs model.dtype bfloat16 .* name triton for"):
        load_recipe(path)


def test_the_gate_model_gives_the_projections_bf16_activations(monkeypatch):
    """H200 run 75's gate measured nothing: the tiny float32 checkpoint moved to bf16 still cast its
    activations to its config's float32, so every FP8 call fell back. bf16_model fixes the config."""
    from hstu_opt.backends.fp8_gate import bf16_model
    from hstu_opt.model import HstuConfig, HstuModel
    from hstu_opt.ops.uvqk import TABLE

    cfg = HstuConfig(num_items=50, num_ratings=5, embedding_dim=64, num_layers=2, num_heads=2, attention_dim=32,
                     linear_dim=32, max_history_len=20, max_targets=4, contextual_len=0, contextual_cardinality=1)
    model = HstuModel(cfg).eval()
    seen, ref = [], TABLE.get(Impl.REFERENCE, "uvqk")
    monkeypatch.setitem(TABLE._impls, (Impl.REFERENCE, "uvqk"), lambda x, *a: seen.append(x.dtype) or ref(x, *a))
    feed = dict(hist_ids=torch.randint(1, 51, (2, 8)), hist_ratings=torch.randint(1, 6, (2, 8)),
                hist_timestamps=torch.arange(16).reshape(2, 8) * 60, hist_lengths=torch.tensor([8, 5]),
                cand_ids=torch.randint(1, 51, (2, 4)), num_candidates=torch.tensor([4, 2]),
                query_time=torch.tensor([900, 900]))
    b16 = bf16_model(model)
    assert b16.cfg.dtype == "bfloat16" and bf16_model(b16) is b16
    assert all(torch.equal(a.float(), b.float()) for a, b in zip(model.state_dict().values(), b16.state_dict().values()))
    model.to(torch.bfloat16)  # what the gate did before: the config still says float32
    with torch.no_grad():
        model.rank(**feed)
        assert set(seen) == {torch.float32}
        seen.clear()
        b16.to(torch.bfloat16).rank(**feed)
    assert set(seen) == {torch.bfloat16} and len(seen) == cfg.num_layers
