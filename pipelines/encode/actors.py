"""GPU (or CPU) stage: an encoder actor holds one model copy and embeds whole units.

Created by job.py with ``num_gpus=1`` per actor when the cluster has GPUs, otherwise
with a share of the CPUs as torch threads. Ray restarts a dead actor (reloading the
bundle, checksum verified) and retries the unit it was holding.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mimdex.encoders.bundle import load_bundle
from mimdex.encoders.inference import embed_images, embed_texts, pick_device


class EncoderActor:
    def __init__(self, model_uri: str, expected_sha256: str, dtype: str, batch_size: int, threads: int):
        self.device = pick_device()
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.encoder = load_bundle(model_uri)
        if self.encoder.sha256 != expected_sha256:
            # the bundle was replaced after the driver planned the run
            raise RuntimeError(f"{model_uri}: weights sha256 {self.encoder.sha256} is not the "
                               f"{expected_sha256} this run started with")
        self.model = self.encoder.model.to(self.device)
        self.dtype, self.batch_size = dtype, batch_size

    def pid(self) -> int:
        return os.getpid()

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"

    def encode(self, tensors: dict) -> dict:
        t0 = time.perf_counter()
        image = embed_images(self.model, tensors["pixels"], self.batch_size, self.device)
        text = None
        if self.model.has_text:
            n = len(tensors["pixels"])
            text = (embed_texts(self.model, tensors["ids"], tensors["mask"], self.batch_size * 4, self.device)
                    if n else np.zeros((0, self.model.cfg.embed_dim), np.float32))
            text = text.astype(self.dtype)
        return {"image_emb": image.astype(self.dtype), "text_emb": text, "seconds": time.perf_counter() - t0}
