"""The towers: image encoders (tiny CNN, CLIP-layout ViT) and text encoders (CLIP-layout
causal transformer, BERT-layout encoder). Each maps its input to ``embed_dim`` floats.

Module and parameter names follow OpenAI CLIP / open_clip (and BERT for the ``bert``
text tower) so that local checkpoints load with a key-by-key map (checkpoints.py).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from mimdex.encoders.config import ImageTowerConfig, TextTowerConfig
from mimdex.encoders.efficientnet import EfficientNetLiteTower


class QuickGELU(nn.Module):
    """CLIP's activation; OpenAI weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(hidden, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class ConvImageTower(nn.Module):
    """Tiny preset: 4 strided conv stages, GroupNorm (batch-size independent, so a
    product embeds identically alone or in a batch), avg+max pooling, projection."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        stages, c_in = [], 3
        for i in range(cfg.layers):
            c = cfg.width * 2**i
            stages.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, c), nn.GELU(),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(8, c), nn.GELU()))
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(2 * c_in, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stages(x)
        return self.proj(torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1))


class VisionTransformer(nn.Module):
    """CLIP's VisionTransformer (key names: conv1, class_embedding, ..., proj)."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        w, grid = cfg.width, cfg.image_size // cfg.patch_size
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class ClipTextTower(nn.Module):
    """CLIP's text transformer: causal attention, pooled at the end-of-text token."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def features(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled text features before the projection."""
        n = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:n]
        x = self.ln_final(self.transformer(x, self.attn_mask[:n, :n].to(x.dtype)))
        last = attention_mask.sum(dim=1).clamp(min=1) - 1  # the end-of-text token
        return x[torch.arange(x.shape[0]), last]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.text_projection

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(tokens, attention_mask))


class BertLayer(nn.Module):
    """One BERT encoder layer, with BERT's parameter names (attention.self.query ...)."""

    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        w, eps = cfg.width, cfg.layer_norm_eps
        self.heads = cfg.heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query, self.attention.self.key, self.attention.self.value = (
            nn.Linear(w, w), nn.Linear(w, w), nn.Linear(w, w))
        self.attention.output = nn.Module()
        self.attention.output.dense, self.attention.output.LayerNorm = nn.Linear(w, w), nn.LayerNorm(w, eps=eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(w, int(w * cfg.mlp_ratio))
        self.output = nn.Module()
        self.output.dense = nn.Linear(int(w * cfg.mlp_ratio), w)
        self.output.LayerNorm = nn.LayerNorm(w, eps=eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        sa = self.attention.self
        q, k, v = (lin(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
                   for lin in (sa.query, sa.key, sa.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        a = a.transpose(1, 2).reshape(b, n, w)
        x = self.attention.output.LayerNorm(x + self.attention.output.dense(a))
        h = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + h)


class BertTextTower(nn.Module):
    """A BERT-style encoder (e.g. all-MiniLM-L6-v2's layout), mean-pooled and projected."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        w = cfg.width
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, w)
        self.embeddings.position_embeddings = nn.Embedding(cfg.context_length, w)
        self.embeddings.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, w)
        self.embeddings.LayerNorm = nn.LayerNorm(w, eps=cfg.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))
        self.text_projection = nn.Parameter(torch.randn(w, embed_dim) * w ** -0.5)

    def features(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled token states (sentence-transformers' pooling), before the projection."""
        e = self.embeddings
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = e.word_embeddings(tokens) + e.position_embeddings(pos) + e.token_type_embeddings(
            torch.zeros_like(tokens))
        x = e.LayerNorm(x)
        key_mask = attention_mask.bool()
        for layer in self.encoder.layer:
            x = layer(x, key_mask)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1.0)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.text_projection

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(tokens, attention_mask))


def build_image_tower(cfg: ImageTowerConfig, embed_dim: int) -> nn.Module:
    if cfg.kind.startswith("efficientnet-lite"):
        return EfficientNetLiteTower(cfg.kind, embed_dim)
    return {"cnn": ConvImageTower, "vit": VisionTransformer}[cfg.kind](cfg, embed_dim)


def build_text_tower(cfg: TextTowerConfig, embed_dim: int) -> nn.Module:
    return {"clip": ClipTextTower, "bert": BertTextTower}[cfg.kind](cfg, embed_dim)
