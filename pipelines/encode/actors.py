"""GPU (or CPU) stage: an encoder actor holds one model copy and embeds whole units.

Created by job.py with ``num_gpus=1`` per actor when the cluster has GPUs, otherwise
with a share of the CPUs as torch threads. Ray restarts a dead actor (reloading the
bundle, checksum verified) and retries the unit it was holding. What is costly to set up
(the compiled model, the pinned staging buffer) is built once here, not per unit.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from mimdex.encoders.bundle import load_bundle
from mimdex.encoders.gpu_decode import decode_into, decoder
from mimdex.encoders.inference import ImageEmbedder, embed_texts, pick_device


class EncoderActor:
    def __init__(self, model_uri: str, expected_sha256: str, dtype: str, batch_size: int, threads: int,
                 compile: bool | None = None):
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
        compile = self.device.type == "cuda" if compile is None else compile
        self.images = ImageEmbedder(self.model, batch_size, self.device, compile)
        t0 = time.perf_counter()
        if compile:  # pay the compilation now, once per actor, not inside the first unit
            size = self.model.cfg.image.image_size
            self.images(np.zeros((batch_size, size, size, 3), np.uint8))
        self.setup_seconds = time.perf_counter() - t0

    def pid(self) -> int:
        return os.getpid()

    def device_name(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else f"cpu x{torch.get_num_threads()}"

    def decoder(self) -> str:
        """Where this actor decodes the JPEGs that --gpu-decode hands it (gpu_decode.decoder)."""
        return decoder(self.device)

    def _pixels(self, tensors: dict):
        """The unit's pixels; JPEGs the decode task handed over are decoded here (nvjpeg on
        a GPU, the CPU path for what it cannot read), with the rows no decoder could read."""
        if "jpeg" not in tensors:
            return tensors["pixels"], [], 0
        pixels = torch.from_numpy(np.array(tensors["pixels"])).to(self.device)
        image = self.model.cfg.image
        failed, fallbacks = decode_into(pixels, tensors["jpeg_rows"].tolist(), tensors["jpeg"], image.image_size,
                                        image.jpeg_draft, use_gpu=self.device.type == "cuda")
        return pixels, [(row, exc.reason, str(exc)) for row, exc in failed], fallbacks

    def encode(self, tensors: dict) -> dict:
        t0 = time.perf_counter()
        pixels, late, fallbacks = self._pixels(tensors)
        t_decode = time.perf_counter() - t0
        copied = self.images.transfer_seconds
        image = self.images(pixels)
        t_transfer = self.images.transfer_seconds - copied
        text = None
        if self.model.has_text:
            n = len(tensors["ids"]) if "ids" in tensors else 0
            text = (embed_texts(self.model, tensors["ids"], tensors["mask"], self.batch_size * 4, self.device)
                    if n else np.zeros((0, self.model.cfg.embed_dim), np.float32))
            text = text.astype(self.dtype)
        if "encode_rows" in tensors:  # a multi-photo unit: place encoded and reused photos, one text per product
            image, text = self._photo_rows(tensors, image, text)
        import ray

        if "encode_rows" in tensors:
            late = [(int(tensors["encode_rows"][row]), reason, detail) for row, reason, detail in late]
        return {"image_emb": image.astype(self.dtype), "text_emb": text, "late_rejects": late,
                "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "",
                "gpu_decode_fallbacks": fallbacks, "seconds": time.perf_counter() - t0 - t_decode - t_transfer,
                "device_decode_seconds": t_decode, "transfer_seconds": t_transfer}

    def _photo_rows(self, tensors: dict, image: np.ndarray, text: np.ndarray | None):
        rows, d = tensors["rows"], self.model.cfg.embed_dim
        full = np.zeros((rows, d), np.float32)
        full[tensors["encode_rows"]] = image
        if len(tensors["reuse_rows"]):
            full[tensors["reuse_rows"]] = tensors["reuse_image"]
        if text is not None:
            text = text[tensors["text_of_row"]] if rows else np.zeros((0, d), self.dtype)
        return full, text
