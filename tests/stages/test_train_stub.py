import json

import torch

from hstu_opt.model.checkpoint import load_checkpoint


def test_tiny_recipe_beats_popularity_on_ml100k(tiny_build):
    path, results = tiny_build
    m = results["train-stub"].record["metrics"]
    model, pop = m["test"], m["popularity_test"]
    assert not results["train-stub"].record["train"]["stopped_by_time"]  # epochs, not the clock, ended training
    assert results["train-stub"].record["data"]["num_users"] == 943
    assert results["train-stub"].record["data"]["num_items"] == 1682
    assert model["hr@10"] > pop["hr@10"]
    assert model["ndcg@10"] > pop["ndcg@10"]
    for task in ("watched", "liked"):
        assert model[f"auc_{task}"] > pop[f"auc_{task}"]
    assert json.loads((path / "train-stub" / "metrics.json").read_text()) == m


def test_checkpoint_in_bundle_loads_and_matches_recipe(tiny_build):
    from hstu_opt.recipe import load_recipe

    path, _ = tiny_build
    recipe = load_recipe("recipes/tiny.yaml")
    model, meta = load_checkpoint(path / "train-stub" / "checkpoint", expect=recipe.model)
    assert meta["data"]["fingerprint"] and meta["metrics"]["test"]["hr@10"] > 0
    assert model.cfg.max_seq_len == 216 and not any(torch.isnan(p).any() for p in model.parameters())
