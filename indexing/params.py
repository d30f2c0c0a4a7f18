"""Choosing IVF-PQ parameters from the vector count, the dimension and a memory budget.

Sources: the faiss wiki ("Guidelines to choose an index": nlist between 4*sqrt(n) and
16*sqrt(n); k-means wants 39..256 training points per centroid) and autofaiss (a
memory budget turns into bytes per code). On CPU the default code is 4-bit fast-scan PQ
(``PQ{m}x4fs``), SIMD-friendly and d/4 bytes per vector with m = d/2 sub-quantizers.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from mimdex.infra.errors import DataError, UsageError

MIN_POINTS_PER_CENTROID = 39   # below this faiss warns that k-means is under-trained
MAX_POINTS_PER_CENTROID = 256  # faiss's own training cap
# faiss's cap, by default: a 64-per-list sample trains 1.5x faster on 200k x 256 but
# costs 0.017 recall@10 (bench_index.py); --train-size trades that explicitly
TRAIN_POINTS_PER_CENTROID = MAX_POINTS_PER_CENTROID
ID_BYTES = 8                   # int64 id stored with every code in the inverted lists


@dataclass(frozen=True)
class IndexParams:
    factory: str
    nlist: int
    pq_m: int
    pq_bits: int
    train_size: int
    code_bytes: int
    estimated_bytes: int
    reasons: tuple[str, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


def parse_memory(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-index-memory: cannot read {text!r} (use e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper()))


def _parse_factory(factory: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"IVF(\d+),PQ(\d+)(?:x(\d+))?(fs)?", factory.replace(" ", ""))
    if not m:
        raise UsageError(f"--factory {factory!r}: expected an IVF-PQ factory string such as "
                         "IVF1024,PQ64x4fs or IVF4096,PQ32")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 8)


def choose(n: int, d: int, max_memory: int | None = None, factory: str | None = None,
           train_size: int | None = None) -> IndexParams:
    reasons = []
    if factory:
        nlist, m, bits = _parse_factory(factory)
        if d % m:
            raise UsageError(f"--factory {factory!r}: PQ{m} does not divide the dimension {d}")
        reasons.append(f"explicit --factory {factory}")
    else:
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
        cap = max(1, n // MIN_POINTS_PER_CENTROID)
        if nlist > cap:
            nlist = 2 ** int(math.log2(cap))
            reasons.append(f"nlist {nlist}: the power of two nearest 4*sqrt(n), capped so that each "
                           f"centroid gets >= {MIN_POINTS_PER_CENTROID} training points")
        else:
            reasons.append(f"nlist {nlist}: the power of two nearest 4*sqrt(n) = {4 * math.sqrt(n):.0f} "
                           "(faiss guideline 4..16*sqrt(n))")
        bits = 4
        m = d // 2
        while d % m:
            m -= 1
        reasons.append(f"PQ{m}x4fs: 4-bit fast-scan PQ, the fast CPU default; m = d/2 gives {m // 2} "
                       "bytes per code")
        if max_memory:
            per_vector = max_memory / max(n, 1) - ID_BYTES
            fits = [c for c in range(m, 0, -1) if d % c == 0 and c % 2 == 0 and c * bits / 8 <= per_vector]
            if not fits:
                raise UsageError(f"--max-index-memory {max_memory} bytes is too small for {n} vectors: even "
                                 f"PQ2x4fs needs {n * (ID_BYTES + 1)} bytes")
            if fits[0] != m:
                reasons.append(f"PQ{fits[0]}x4fs: the largest even divisor of d={d} whose codes fit "
                               f"--max-index-memory ({per_vector:.1f} bytes per vector for code + id)")
            m = fits[0]
        factory = f"IVF{nlist},PQ{m}x4fs"
    needed = max(nlist, 2 ** bits)
    if n < needed:
        raise DataError(f"{n} vectors are too few to train {factory}: it needs at least {needed} "
                        f"({nlist} IVF lists, {2 ** bits} PQ centroids per sub-quantizer)")
    code_bytes = math.ceil(m * bits / 8)
    if train_size:
        train_size = min(n, train_size)
        reasons.append(f"training sample {train_size}: --train-size")
    else:
        train_size = min(n, max(TRAIN_POINTS_PER_CENTROID * nlist, 2 ** bits * MAX_POINTS_PER_CENTROID))
        reasons.append(f"training sample {train_size}: min(n, {TRAIN_POINTS_PER_CENTROID} * nlist), faiss's own cap "
                       f"(39..256 per list is its guideline), and at least the {2 ** bits * MAX_POINTS_PER_CENTROID} "
                       "points PQ training samples")
    estimated = n * (code_bytes + ID_BYTES) + nlist * d * 4 + (2 ** bits) * d * 4
    if max_memory and estimated > max_memory:
        raise UsageError(f"{factory} needs about {estimated} bytes for {n} vectors, over --max-index-memory "
                         f"{max_memory}")
    return IndexParams(factory, nlist, m, bits, train_size, code_bytes, estimated, tuple(reasons))
