"""Checkpoints: safetensors weights + checkpoint.json (config, vocab sizes, metrics, data fingerprint).

Loading checks the config against the recipe and every tensor's name and shape against the model,
and says which field or tensor is wrong. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hstu_opt.errors import CheckpointError
from hstu_opt.fsutil import write_json_atomic
from hstu_opt.model.config import HstuConfig
from hstu_opt.model.hstu import HstuModel
from hstu_opt.recipe import ModelSection

WEIGHTS = "model.safetensors"
META = "checkpoint.json"
FORMAT = "hstu-opt-checkpoint/1"


def save_checkpoint(directory: Path, model: HstuModel, extra: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / WEIGHTS)
    write_json_atomic(directory / META, {"format": FORMAT, "config": model.cfg.to_dict(), **extra})


def read_meta(directory: Path) -> dict:
    meta_path = directory / META
    if not meta_path.is_file():
        raise CheckpointError(f"{directory}: no {META}: pass a checkpoint directory written by train-stub or import-stu")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r} is not {FORMAT!r}: re-export the checkpoint")
    return meta


def check_against_recipe(cfg: HstuConfig, model: ModelSection, where: str) -> None:
    for field, want in model.model_dump().items():
        have = getattr(cfg, field, None)
        if isinstance(have, tuple):
            want = tuple(want)
        if have != want:
            raise CheckpointError(f"{where}: checkpoint has {field}={have!r} but the recipe's model.{field}={want!r}: "
                                  "retrain (hstu-opt train-stub) or make the recipe match the checkpoint")


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors do not match the model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}): the checkpoint was made for another model layout")
    for name, t in expected.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, the model needs "
                                  f"{tuple(t.shape)}: check the recipe's model section")
    model.load_state_dict(state)


def load_checkpoint(directory: Path, expect: ModelSection | None = None) -> tuple[HstuModel, dict]:
    meta = read_meta(directory)
    cfg = HstuConfig.from_dict(meta["config"])
    if expect is not None:
        check_against_recipe(cfg, expect, str(directory))
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"{directory / WEIGHTS}: unreadable ({exc}): rebuild the checkpoint") from exc
    model = HstuModel(cfg)
    load_state_checked(model, state, str(directory / WEIGHTS))
    return model.eval(), meta


# Meta generative-recommenders STULayer parameter names -> ours (same shapes).
STU_NAMES = ("uvqk_weight", "uvqk_beta", "input_norm_weight", "input_norm_bias", "output_weight",
             "output_norm_weight", "output_norm_bias")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from .safetensors, or from a torch file loaded with weights_only=True (no arbitrary objects)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found: pass a .safetensors or .pt state_dict")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or corrupt files
        raise CheckpointError(f"{path}: cannot be read as a plain tensor state_dict ({type(exc).__name__}): "
                              "save it with torch.save(model.state_dict()) or as safetensors") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a mapping of names to tensors: save model.state_dict()")
    return obj


def import_stu(model: HstuModel, state: dict[str, torch.Tensor], where: str) -> int:
    """Copy `[prefix]_stu_layers.<i>._<name>` tensors into model.layers[i]. Returns the layer count."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "_stu_layers" and parts[-1].lstrip("_") in STU_NAMES:
            found.setdefault(int(parts[-2]), {})[parts[-1].lstrip("_")] = t
    if not found:
        raise CheckpointError(f"{where}: no '_stu_layers.<i>._uvqk_weight'-style tensors found: is this a "
                              "generative-recommenders STU state_dict?")
    if sorted(found) != list(range(len(model.layers))):
        raise CheckpointError(f"{where}: has STU layers {sorted(found)}, the recipe's model.num_layers="
                              f"{len(model.layers)}: make them agree")
    ours = {f"layers.{i}.{n}": t for i, tensors in found.items() for n, t in tensors.items()}
    full = dict(model.state_dict())
    full.update({k: v.to(full[k].dtype) if k in full else v for k, v in ours.items()})
    load_state_checked(model, full, where)
    return len(found)


def import_stu_checkpoint(state_path: Path, recipe, out: Path, base: Path | None) -> int:
    """Write a checkpoint whose STU stack comes from `state_path`; embeddings and heads come from `base`
    (a trained checkpoint) or, without one, are freshly initialized for the recipe's data vocab."""
    from hstu_opt.data.sequences import NUM_RATINGS, load_sequences

    if base is not None:
        model, meta = load_checkpoint(base, expect=recipe.model)
        extra = {"imported_from": str(state_path), "base": str(base), "data": meta.get("data", {})}
    else:
        torch.manual_seed(recipe.train.seed)
        seqs = load_sequences(recipe.data, recipe.model.contextual_len)
        cfg = HstuConfig.from_recipe(recipe.model, num_items=seqs.num_items, num_ratings=NUM_RATINGS,
                                     contextual_cardinality=seqs.contextual_cardinality)
        model = HstuModel(cfg)
        extra = {"imported_from": str(state_path), "base": None, "data": {"fingerprint": seqs.fingerprint}}
    layers = import_stu(model, read_state_dict(state_path), str(state_path))
    save_checkpoint(out, model, {**extra, "metrics": None})
    return layers
