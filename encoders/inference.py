"""Batched inference shared by the bundle's Encoder and the encode pipeline's actors,
so a product gets the same vector whichever path embeds it.

Inputs arrive as uint8 pixels and int32 token ids (what CPU decode workers produce);
normalisation happens on the target device, so only a quarter of the bytes cross the
PCIe bus. On CUDA: bf16 autocast, one pinned host buffer reused for every batch, the copy
of the next batch on a side stream while the current one computes, channels-last, and
(optionally) a compiled model for the one fixed batch shape. Text batches are bucketed
by length and each is cut to its longest title, not padded to the context length.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from mimdex.encoders.model import MIMModel


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    # Arrays from Ray's object store are read-only views; every use below copies
    # (to float, to the device) before anything is written, so no copy is made here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array))


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = _from_numpy(array)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _autocast(device: torch.device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


class ImageEmbedder:
    """uint8 N x S x S x 3 (numpy, or a tensor already on the device) -> float32 N x d.

    Built once per encoder actor: the pinned staging buffer, the copy stream and the
    compiled model (``compile=True``: torch.compile for the fixed batch shape, the last
    batch padded to it so nothing recompiles) are paid for once, not per unit.
    """

    def __init__(self, model: MIMModel, batch_size: int = 256, device: torch.device | None = None,
                 compile: bool = False):
        self.model, self.batch_size = model, batch_size
        self.device = device or next(model.parameters()).device
        self.mean = torch.tensor(model.cfg.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(model.cfg.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self.cuda = self.device.type == "cuda"
        self.channels_last = self.cuda or getattr(model.visual, "channels_last", False)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.fn = torch.compile(model.encode_image, dynamic=False) if compile else model.encode_image
        self.fixed_shape = compile
        size = model.cfg.image.image_size
        self._staging = (torch.empty((batch_size, size, size, 3), dtype=torch.uint8).pin_memory()
                         if self.cuda else None)
        self._copy_stream = torch.cuda.Stream() if self.cuda else None
        self.transfer_seconds = 0.0  # host -> device copies, for the pipeline's stage report

    def _upload(self, pixels, i: int) -> torch.Tensor:
        chunk = pixels[i:i + self.batch_size]
        if isinstance(chunk, torch.Tensor):
            return chunk.to(self.device, non_blocking=True)
        if not self.cuda:
            return _from_numpy(chunk)
        t0 = time.perf_counter()
        n = len(chunk)
        self._staging[:n].copy_(_from_numpy(chunk))
        with torch.cuda.stream(self._copy_stream):
            out = self._staging[:n].to(self.device, non_blocking=True)
        # the staging buffer is reused for the next batch only after this copy is done
        self._copy_stream.synchronize()
        torch.cuda.current_stream().wait_stream(self._copy_stream)
        self.transfer_seconds += time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def __call__(self, pixels) -> np.ndarray:
        out = []
        n = len(pixels)
        nxt = self._upload(pixels, 0) if n else None
        for i in range(0, n, self.batch_size):
            x, m = nxt, min(self.batch_size, n - i)
            if i + self.batch_size < n:  # the next batch's copy overlaps this batch's compute
                nxt = self._upload(pixels, i + self.batch_size)
            if self.fixed_shape and m < self.batch_size:
                x = torch.cat([x, x[-1:].expand(self.batch_size - m, *x.shape[1:])])
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(self.device):
                out.append(self.fn((x - self.mean) / self.std)[:m].float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.cfg.embed_dim), np.float32)


def embed_images(model: MIMModel, pixels: np.ndarray, batch_size: int = 256,
                 device: torch.device | None = None) -> np.ndarray:
    """uint8 N x S x S x 3 -> float32 N x d, L2-normalised."""
    return ImageEmbedder(model, batch_size, device)(pixels)


def length_buckets(mask: np.ndarray, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """Batches of row positions of similar token length, each with its longest length:
    rows sorted by length, so a batch of 20-token titles is not padded to 77."""
    lengths = mask.sum(1).astype(np.int64) if len(mask) else np.zeros(0, np.int64)
    order = np.argsort(lengths, kind="stable")
    return [(order[i:i + batch_size], max(int(lengths[order[i:i + batch_size]].max()), 1))
            for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def embed_texts(model: MIMModel, ids: np.ndarray, mask: np.ndarray, batch_size: int = 1024,
                device: torch.device | None = None, bucket: bool = True) -> np.ndarray:
    """Token ids and attention mask (N x L, right-padded) -> float32 N x d, L2-normalised.

    Padding is masked out by both text towers (causal attention and end-of-text pooling
    in the CLIP tower, key masks and masked mean pooling in the BERT tower), so cutting a
    batch to its longest row does not change its vectors."""
    device = device or next(model.parameters()).device
    out = np.zeros((len(ids), model.cfg.embed_dim), np.float32)
    batches = (length_buckets(mask, batch_size) if bucket else
               [(np.arange(i, min(i + batch_size, len(ids))), ids.shape[1]) for i in range(0, len(ids), batch_size)])
    for rows, length in batches:
        tok = _to_device(ids[rows, :length], device).long()
        att = _to_device(mask[rows, :length], device).long()
        with _autocast(device):
            out[rows] = model.encode_text(tok, att).float().cpu().numpy()
    return out
