"""Symmetric InfoNCE terms of the MIM objective (pure functions of embeddings).

Row i of every tensor in a batch belongs to the same training product, so the
diagonal holds the positives and every other row is an in-batch negative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mimdex.encoders.config import LossWeights
from mimdex.encoders.model import fuse


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the a x b cosine-similarity matrix."""
    logits = logit_scale.exp().clamp(max=100.0) * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def mim_loss(emb: dict[str, torch.Tensor], weights: LossWeights, logit_scale: torch.Tensor,
             fuse_alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms whose weight is non-zero; returns (loss, per-term values).

    ``emb`` keys: query_image, product_image, and when the variant uses them title,
    query_text (short text queries) and fused_image + fused_text (the image and text of
    a multimodal query whose target is the row's product).
    """
    terms: dict[str, torch.Tensor] = {}
    if weights.image_image:
        terms["image_image"] = info_nce(emb["query_image"], emb["product_image"], logit_scale)
    if weights.query_title:
        terms["query_title"] = info_nce(emb["query_image"], emb["title"], logit_scale)
    if weights.product_title:
        terms["product_title"] = info_nce(emb["product_image"], emb["title"], logit_scale)
    if weights.text_product:
        terms["text_product"] = 0.5 * (info_nce(emb["query_text"], emb["product_image"], logit_scale)
                                       + info_nce(emb["query_text"], emb["title"], logit_scale))
    if weights.fused_product:
        fused = fuse(emb["fused_image"], emb["fused_text"], fuse_alpha)
        terms["fused_product"] = 0.5 * (info_nce(fused, emb["product_image"], logit_scale)
                                        + info_nce(fused, emb["title"], logit_scale))
    total = sum(getattr(weights, name) * value for name, value in terms.items())
    return total, {name: float(value.detach()) for name, value in terms.items()}
