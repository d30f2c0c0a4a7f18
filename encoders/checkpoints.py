"""Initialising towers from local checkpoints (nothing is downloaded).

* CLIP (OpenAI or open_clip key names), a safetensors file: ``visual.*`` goes to the
  image tower; ``token_embedding``, ``positional_embedding``, ``transformer.*``,
  ``ln_final.*``, ``text_projection`` to the text tower; ``logit_scale`` stays.
* A BERT-style directory (config.json, model.safetensors, tokenizer.json, e.g.
  all-MiniLM-L6-v2) for the ``bert`` text tower.

Every load reports the keys it mapped, the model keys it left missing and the
checkpoint keys it did not use.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from mimdex.encoders.config import TextTowerConfig
from mimdex.infra.errors import DataError

# Entries of OpenAI's state dict that are hyper-parameters, not weights.
_CLIP_NON_WEIGHTS = {"input_resolution", "context_length", "vocab_size"}
_CLIP_TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # model keys the checkpoint lacked
    unexpected: list[str] = field(default_factory=list)   # checkpoint keys not used
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)} {self.missing[:5]}; "
                f"unexpected {len(self.unexpected)} {self.unexpected[:5]}; "
                f"shape mismatch {len(self.shape_mismatch)} {self.shape_mismatch[:5]}")


def clip_key_to_model(key: str) -> str | None:
    key = key.removeprefix("module.")
    if key in _CLIP_NON_WEIGHTS:
        return None
    if key.startswith("visual.") or key == "logit_scale":
        return key
    if key.startswith(_CLIP_TEXT_PREFIXES):
        return "text." + key
    return None


def apply_state(model: torch.nn.Module, mapped: dict[str, torch.Tensor], unexpected: list[str],
           only_prefix: str = "") -> LoadReport:
    own = model.state_dict()
    report = LoadReport(unexpected=list(unexpected))
    update = {}
    for k, v in mapped.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.shape_mismatch.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}")
        else:
            update[k] = v.to(own[k].dtype)
            report.loaded.append(k)
    report.missing = sorted(k for k in own if k.startswith(only_prefix) and k not in update)
    model.load_state_dict(update, strict=False)
    return report


def load_clip_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    mapped, unused = {}, []
    for k, v in state.items():
        target = clip_key_to_model(k)
        if target is None:
            if k.removeprefix("module.") not in _CLIP_NON_WEIGHTS:
                unused.append(k)
        else:
            mapped[target] = v
    return apply_state(model, mapped, unused)


def load_clip_checkpoint(model: torch.nn.Module, path: str) -> LoadReport:
    if not path.endswith(".safetensors"):
        raise DataError(f"{path}: only .safetensors CLIP checkpoints are read (no pickle); "
                        "convert a .pt/.bin state dict with safetensors.torch.save_file first")
    return load_clip_state_dict(model, load_file(path))


def bert_text_config(checkpoint_dir: str, **overrides) -> TextTowerConfig:
    """The ``bert`` text-tower config that matches a BERT-style checkpoint directory."""
    path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        cfg = dict(kind="bert", vocab_size=c["vocab_size"], context_length=c["max_position_embeddings"],
                   width=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                   mlp_ratio=c["intermediate_size"] / c["hidden_size"],
                   type_vocab_size=c.get("type_vocab_size", 2), layer_norm_eps=c.get("layer_norm_eps", 1e-12))
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"{path}: not a BERT-style config: {exc}") from exc
    cfg.update(overrides)
    return TextTowerConfig(**cfg)


def load_bert_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """A BERT-style encoder's state dict into ``model.text``."""
    mapped, unused = {}, []
    for k, v in state.items():
        k2 = k.removeprefix("bert.")
        if k2.startswith(("embeddings.", "encoder.")) and "position_ids" not in k2:
            mapped["text." + k2] = v
        else:
            unused.append(k)  # e.g. pooler.*: mean pooling replaces it
    return apply_state(model, mapped, unused, only_prefix="text.")


def load_bert_checkpoint(model: torch.nn.Module, checkpoint_dir: str) -> tuple[LoadReport, Tokenizer]:
    """Load a BERT-style encoder into ``model.text``; returns the report and its tokenizer."""
    report = load_bert_state(model, load_file(os.path.join(checkpoint_dir, "model.safetensors")))
    tok = Tokenizer.from_file(os.path.join(checkpoint_dir, "tokenizer.json"))
    return report, tok
