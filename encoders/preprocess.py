"""Image preprocessing that lives with the model bundle (size, mean, std in config.json),
so training, the encode pipeline and a serving encoder produce identical inputs (the
decoding itself is images.load_pixels)."""
from __future__ import annotations

import numpy as np
import torch



def to_tensor(pixels: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 N x S x S x 3 -> normalised float32 N x 3 x S x S."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s
