"""Model bundles: a directory at any fsspec URI (docs/contracts.md, "Model bundle").

    config.json        architecture, variant, d, preprocessing, tokenizer settings and the
                       sha256 of model.safetensors and tokenizer.json (written last)
    model.safetensors  weights (never pickle)
    tokenizer.json     the `tokenizers` tokenizer
    README.md          model card: data, loss weights, validation metrics

Loading verifies both checksums and refuses a tampered bundle, naming the file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tokenizers import Tokenizer

from mimdex.encoders.config import ModelConfig
from mimdex.encoders.model import MIMModel, fuse
from mimdex.encoders.inference import embed_images, embed_texts
from mimdex.encoders.images import load_pixels
from mimdex.encoders.text import configure, tokenize_arrays
from mimdex.infra import storage
from mimdex.infra.errors import DataError

BUNDLE_FORMAT = "mimdex-model-bundle/1"


class BundleError(DataError):
    """A bundle that is incomplete, tampered with, or of another format."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_dict_bytes(model: MIMModel) -> bytes:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return st_save(state, metadata={"format": BUNDLE_FORMAT})


def save_bundle(model: MIMModel, tokenizer: Tokenizer, out: str, card: str,
                extra: dict | None = None) -> str:
    """Write the bundle; returns the weights' sha256. config.json goes last."""
    weights = state_dict_bytes(model)
    tok_json = tokenizer.to_str().encode("utf-8")
    storage.write_bytes(storage.join(out, "model.safetensors"), weights)
    storage.write_bytes(storage.join(out, "tokenizer.json"), tok_json)
    storage.write_bytes(storage.join(out, "README.md"), card.encode("utf-8"))
    cfg = model.cfg
    config = {
        "format": BUNDLE_FORMAT,
        "model": cfg.to_dict(),
        "variant": cfg.variant,
        "embed_dim": cfg.embed_dim,
        "preprocessing": {"image_size": cfg.image.image_size, "mean": list(cfg.mean),
                          "std": list(cfg.std), "resize": "bicubic, no crop",
                          "decode": "EXIF transpose; alpha composited on white; RGB",
                          "jpeg_draft": cfg.image.jpeg_draft},
        "tokenizer": {"file": "tokenizer.json", "context_length": cfg.text.token_limit},
        "sha256": {"model.safetensors": sha256(weights), "tokenizer.json": sha256(tok_json)},
        **(extra or {}),
    }
    storage.write_json(storage.join(out, "config.json"), config)
    return config["sha256"]["model.safetensors"]


def save_untrained_bundle(out: str, titles: list[str], variant: str = "3-tower", preset_name: str = "tiny",
                         seed: int = 0) -> str:
    """A bundle with freshly initialised weights and a tokenizer fitted on ``titles``.

    For throughput benchmarks and pipeline tests, where what matters is the
    architecture, not what it learned. Returns the weights' sha256.
    """
    from mimdex.encoders.config import preset
    from mimdex.encoders.text import train_tokenizer

    torch.manual_seed(seed)
    cfg = preset(preset_name, variant)
    tok = train_tokenizer(titles, cfg.text.vocab_size, cfg.text.token_limit)
    return save_bundle(MIMModel(cfg).eval(), tok, out, f"# untrained {preset_name} {variant} (seed {seed})\n"
                       "Random weights: for benchmarks and pipeline tests only.\n")


@dataclass
class Encoder:
    """A loaded bundle: the model, its tokenizer and preprocessing, ready to embed."""

    model: MIMModel
    tokenizer: Tokenizer
    config: dict
    uri: str

    @property
    def cfg(self) -> ModelConfig:
        return self.model.cfg

    @property
    def sha256(self) -> str:
        return self.config["sha256"]["model.safetensors"]

    def pixels(self, images: list[bytes]) -> np.ndarray:
        image = self.cfg.image
        return np.stack([load_pixels(b, image.image_size, image.jpeg_draft) for b in images])

    def embed_pixels(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        return embed_images(self.model, pixels, batch_size)

    def encode_images(self, images: list[bytes], batch_size: int = 256) -> np.ndarray:
        return self.embed_pixels(self.pixels(images), batch_size)

    def encode_texts(self, texts: list[str], batch_size: int = 1024) -> np.ndarray:
        ids, mask = tokenize_arrays(self.tokenizer, texts)
        return embed_texts(self.model, ids, mask, batch_size)

    def encode_queries(self, images: list[bytes], texts: list[str], alpha: float | None = None) -> np.ndarray:
        """Multimodal search vectors: each image fused with its reformulation text."""
        img = torch.from_numpy(self.encode_images(images))
        txt = torch.from_numpy(self.encode_texts(texts))
        return fuse(img, txt, self.cfg.fuse_alpha if alpha is None else alpha).numpy()

    def encode_query(self, image: bytes, text: str | None = None, alpha: float | None = None) -> np.ndarray:
        """One search vector: the image, or image + reformulation text fused."""
        if not text:
            return self.encode_images([image])[0]
        return self.encode_queries([image], [text], alpha)[0]


def load_bundle(uri: str) -> Encoder:
    config_uri = storage.join(uri, "config.json")
    config = storage.read_json(config_uri)
    if config.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{config_uri}: not a mimdex model bundle (format {config.get('format')!r})")
    blobs = {}
    for name, expected in config["sha256"].items():
        data = storage.read_bytes(storage.join(uri, name))
        if sha256(data) != expected:
            raise BundleError(f"{storage.join(uri, name)}: sha256 {sha256(data)} does not match "
                              f"{expected} recorded in config.json; refusing a tampered bundle")
        blobs[name] = data
    cfg = ModelConfig.from_dict(config["model"])
    model = MIMModel(cfg)
    try:
        model.load_state_dict(st_load(blobs["model.safetensors"]), strict=True)
    except RuntimeError as exc:
        raise BundleError(f"{storage.join(uri, 'model.safetensors')}: weights do not fit the "
                          f"architecture in config.json: {exc}") from exc
    model.eval()
    tok = configure(Tokenizer.from_str(blobs["tokenizer.json"].decode("utf-8")), cfg.text.token_limit)
    return Encoder(model, tok, config, uri)
