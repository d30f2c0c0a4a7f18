"""Image preprocessing that lives with the model bundle (size, mean, std in config.json),
so training, the encode pipeline and a serving encoder produce identical inputs."""
from __future__ import annotations

import numpy as np
import torch

from mimdex.encoders.images import decode_rgb, to_array


def load_pixels(data: bytes, size: int) -> np.ndarray:
    """Image bytes -> uint8 size x size x 3 (decode, EXIF, alpha on white, resize)."""
    return to_array(decode_rgb(data), size)


def to_tensor(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 N x S x S x 3 -> normalised float32 N x 3 x S x S."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
