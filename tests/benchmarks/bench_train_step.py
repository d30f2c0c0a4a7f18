"""The image tower's training step on a CPU: bf16 autocast with differentiated depthwise
convolutions in fp32 (what training runs) against bf16 throughout and fp32 throughout.

    .venv/bin/python tests/benchmarks/bench_train_step.py [--batch 256] [--size 128] [--repeats 5]

EfficientNet-Lite0 with the pretrained recipe's 6 frozen blocks, forward + backward of
``--batch`` random images (a 3-tower step embeds 2 x 128). Each mode runs --repeats times
after a warm-up, alternated; the best is kept. Then the depthwise convolutions alone, per
shape of the trained blocks, forward + backward in bf16 and in fp32 (docs/benchmarks.md,
"The demo's time").
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from mimdex.encoders.efficientnet import EfficientNetLiteTower, SameConv2d


@contextlib.contextmanager
def all_bf16():
    """The reference: every convolution under autocast's bf16 (the rule switched off)."""
    rule = SameConv2d._conv
    SameConv2d._conv = lambda self, x: torch.nn.Conv2d.forward(self, x)
    try:
        yield
    finally:
        SameConv2d._conv = rule


def step_seconds(tower, x, mode: str) -> float:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32")
    with (all_bf16() if mode == "bf16" else contextlib.nullcontext()):
        t = time.perf_counter()
        with autocast:
            out = tower(x)
        out.float().square().sum().backward()
        tower.zero_grad(set_to_none=True)
        return time.perf_counter() - t


def depthwise_ms(shape, k: int, stride: int, dtype, repeats: int) -> float:
    n, c, h, w = shape
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    wt = torch.randn(c, 1, k, k, dtype=dtype, requires_grad=True)
    best = float("inf")
    for _ in range(repeats + 1):
        t = time.perf_counter()
        y = F.conv2d(x, wt, stride=stride, groups=c, padding=k // 2 if stride == 1 else 0)
        y.backward(torch.ones_like(y))
        best = min(best, time.perf_counter() - t)
    return best * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    tower = EfficientNetLiteTower("efficientnet-lite0", 256).to(memory_format=torch.channels_last).train()
    tower.freeze(6)
    x = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    modes = ("mixed", "bf16", "fp32")
    best = {m: float("inf") for m in modes}
    for m in modes:
        step_seconds(tower, x, m)  # warm-up: oneDNN primitives
    for _ in range(args.repeats):
        for m in modes:
            best[m] = min(best[m], step_seconds(tower, x, m))
    print(f"image tower step, {args.batch} images at {args.size} px, {torch.get_num_threads()} threads (best of "
          f"{args.repeats}):")
    for m, what in zip(modes, ("bf16, differentiated depthwise in fp32 (training)", "bf16 throughout (reference)",
                               "fp32 throughout")):
        print(f"  {what:<52} {best[m]:7.3f} s   {best['bf16'] / best[m]:.2f}x the reference's speed")
    size = args.size // 16  # blocks 6-15 run at 1/16 and 1/32 of the input
    shapes = [((args.batch, 672, size + 3, size + 3), 5, 2), ((args.batch, 480, size, size), 5, 1),
              ((args.batch, 672, size, size), 5, 1), ((args.batch, 1152, size // 2, size // 2), 5, 1)]
    rows = []
    print("depthwise convolution, forward + backward (ms):")
    for shape, k, s in shapes:
        bf, fp = (depthwise_ms(shape, k, s, dt, args.repeats) for dt in (torch.bfloat16, torch.float32))
        rows.append({"shape": list(shape), "kernel": k, "stride": s, "bf16_ms": round(bf, 1), "fp32_ms": round(fp, 1)})
        print(f"  {str(shape):<22} k{k} s{s}   bf16 {bf:7.1f}   fp32 {fp:7.1f}   bf16/fp32 {bf / fp:.2f}")
    result = {"batch": args.batch, "size": args.size, "threads": torch.get_num_threads(),
              "step_s": {m: round(v, 3) for m, v in best.items()},
              "speedup_vs_bf16": round(best["bf16"] / best["mixed"], 2), "depthwise": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
