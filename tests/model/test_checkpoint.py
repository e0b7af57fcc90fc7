import pickle
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from hstu_opt.errors import CheckpointError
from hstu_opt.model import HstuModel
from hstu_opt.model.checkpoint import import_stu, load_checkpoint, read_state_dict, save_checkpoint
from hstu_opt.recipe import ModelSection
from tests.model.helpers import tiny_model


def test_round_trip_is_bit_exact(tmp_path):
    model = tiny_model(C=1)
    save_checkpoint(tmp_path / "ck", model, {"metrics": {"x": 1}})
    loaded, meta = load_checkpoint(tmp_path / "ck")
    assert meta["metrics"] == {"x": 1}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.cfg == model.cfg


def test_config_mismatch_names_the_field(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", model, {})
    section = ModelSection(embedding_dim=50, num_layers=2, num_heads=4, attention_dim=25, linear_dim=25,
                           max_history_len=40, max_targets=6)
    with pytest.raises(CheckpointError, match="num_heads=2 but the recipe's model.num_heads=4"):
        load_checkpoint(tmp_path / "ck", expect=section)


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ck", model, {})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["layers.1.uvqk_weight"] = state["layers.1.uvqk_weight"][:, :-1].contiguous()
    save_file(state, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layers.1.uvqk_weight"):
        load_checkpoint(tmp_path / "ck")


def _meta_state_dict(model, prefix="_hstu."):
    return {f"{prefix}_stu_layers.{i}._{n}": p.detach().clone() * 2
            for i, layer in enumerate(model.layers) for n, p in layer.named_parameters()}


def test_import_stu_copies_every_layer_tensor(tmp_path):
    src, dst = tiny_model(seed=1), tiny_model(seed=2)
    meta_sd = _meta_state_dict(src)
    torch.save(meta_sd, tmp_path / "gr.pt")
    assert import_stu(dst, read_state_dict(tmp_path / "gr.pt"), "gr.pt") == 2
    for i, layer in enumerate(dst.layers):
        for n, p in layer.named_parameters():
            assert torch.equal(p, meta_sd[f"_hstu._stu_layers.{i}._{n}"])


def test_import_stu_rejects_wrong_layer_count_and_pickled_objects(tmp_path):
    model = tiny_model()
    sd = _meta_state_dict(model)
    del_keys = [k for k in sd if "_stu_layers.1." in k]
    for k in del_keys:
        del sd[k]
    with pytest.raises(CheckpointError, match="num_layers=2"):
        import_stu(model, sd, "x")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"a": Evil()}, f)
    with pytest.raises(CheckpointError, match="plain tensor state_dict"):
        read_state_dict(tmp_path / "evil.pt")


def test_imported_stu_stack_with_context_window_and_min_full_equals_float64_spec(tmp_path):
    """A generative-recommenders STU stack with contextual rows, a local window and min_full_attn_seq_len,
    imported and run in fp32, equals HSTU.md's pseudo-code in float64 (tests/ops/oracle.py) layer by layer."""
    from hstu_opt.model.layout import JaggedSeqs
    from tests.ops import oracle

    C, window, full = 2, 4, 3
    model = tiny_model(C=C, window=window, D=32, H=2, dqk=16, dv=16, seed=3)
    cfg = replace(model.cfg, min_full_attn_seq_len=full)
    dst = HstuModel(cfg).eval()
    sd = _meta_state_dict(model)
    torch.save(sd, tmp_path / "gr.pt")
    assert import_stu(dst, read_state_dict(tmp_path / "gr.pt"), "gr.pt") == 2
    lengths, nt = [23, 9, 40], [3, 1, 5]  # 40 rows: ids far past the window, so the contextual rows drop out
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), 32, generator=g)
    got, want = x, x.double()
    with torch.no_grad():
        for layer in dst.layers:
            got, _, _ = layer(got, JaggedSeqs(offsets, torch.tensor(nt)))
            params = dict(layer.named_parameters())
            want = oracle.stu_layer(want, params, offsets, nt, cfg.max_seq_len, 2, 16, 16, C=C, max_attn_len=window,
                                    min_full_attn_seq_len=full)
    rel = float((got.double() - want).abs().max() / want.abs().max())
    assert rel <= 1e-5, rel
    # the window matters at these lengths (else this test could not tell the semantics apart)
    no_window = x.double()
    for layer in dst.layers.requires_grad_(False):
        no_window = oracle.stu_layer(no_window, dict(layer.named_parameters()), offsets, nt, cfg.max_seq_len, 2, 16, 16,
                                     C=C, max_attn_len=0)
    assert float((no_window - want).abs().max() / want.abs().max()) > 1e-3
