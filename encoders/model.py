"""The MIM model: one image tower shared by query and product images, one text tower
shared by titles and short text queries, all in one L2-normalised space of ``embed_dim``.

API in the open_clip style: ``encode_image``, ``encode_text`` (``normalize=``) and
``encode_query`` for multimodal search (image + reformulation text fused in one vector).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mimdex.encoders.config import ModelConfig
from mimdex.encoders.towers import build_image_tower, build_text_tower


class MIMModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = build_image_tower(cfg.image, cfg.embed_dim)
        # image-only (the metric-learning baseline) has no text tower at all.
        self.text = None if cfg.variant == "image-only" else build_text_tower(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    @property
    def has_text(self) -> bool:
        return self.text is not None

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """``images``: float N x 3 x S x S, already preprocessed (preprocess.py)."""
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = True) -> torch.Tensor:
        if self.text is None:
            raise ValueError("this is an image-only model: it has no text tower")
        x = self.text(tokens, attention_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_query(self, images: torch.Tensor, tokens: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None, alpha: float | None = None) -> torch.Tensor:
        """A search vector: the image alone, or image and text fused as
        normalize((1 - alpha) * image + alpha * text)."""
        img = self.encode_image(images)
        if tokens is None:
            return img
        return fuse(img, self.encode_text(tokens, attention_mask), self.cfg.fuse_alpha if alpha is None else alpha)


def fuse(image_emb: torch.Tensor, text_emb: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.normalize((1.0 - alpha) * image_emb + alpha * text_emb, dim=-1)
