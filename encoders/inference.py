"""Batched inference shared by the bundle's Encoder and the encode pipeline's actors,
so a product gets the same vector whichever path embeds it.

Inputs arrive as uint8 pixels and int32 token ids (what CPU decode workers produce);
normalisation happens on the target device, so only a quarter of the bytes cross the
PCIe bus. On CUDA: pinned host memory, non-blocking copies and bf16 autocast.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from mimdex.encoders.model import MIMModel


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Arrays from Ray's object store are read-only views; every use below copies
    # (to float, to the device) before anything is written, so no copy is made here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _autocast(device: torch.device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def embed_images(model: MIMModel, pixels: np.ndarray, batch_size: int = 256,
                 device: torch.device | None = None) -> np.ndarray:
    """uint8 N x S x S x 3 -> float32 N x d, L2-normalised."""
    device = device or next(model.parameters()).device
    mean = torch.tensor(model.cfg.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.cfg.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    out = []
    for i in range(0, len(pixels), batch_size):
        x = _to_device(pixels[i:i + batch_size], device).permute(0, 3, 1, 2).float().div_(255.0)
        with _autocast(device):
            out.append(model.encode_image((x - mean) / std).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.embed_dim), np.float32)


@torch.inference_mode()
def embed_texts(model: MIMModel, ids: np.ndarray, mask: np.ndarray, batch_size: int = 1024,
                device: torch.device | None = None) -> np.ndarray:
    """Token ids and attention mask (N x context) -> float32 N x d, L2-normalised."""
    device = device or next(model.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        tok = _to_device(ids[i:i + batch_size], device).long()
        att = _to_device(mask[i:i + batch_size], device).long()
        with _autocast(device):
            out.append(model.encode_text(tok, att).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, model.cfg.embed_dim), np.float32)
