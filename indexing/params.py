"""Choosing the index from the vector count, the dimension and a memory budget.

    [IVF coarse lists, flat or HNSW] + [codes scanned in the lists] (+ optional re-ranking codes)

Sources: the faiss wiki ("Guidelines to choose an index": nlist between 4*sqrt(n) and
16*sqrt(n), an HNSW coarse quantizer from about 1M vectors up; k-means wants 39..256
training points per centroid) and the sweep of code options in docs/benchmarks.md
("Which codes", tests/benchmarks/bench_codes.py). At 1M x 256 on this project's CPU:

    codes                        bytes/vector  recall@10 cap  queries/s at recall >= 0.95
    PQ128x4fs (fast-scan)              81          0.63         (never reaches it)
    PQ64x8                             77          0.93         (never reaches it)
    OPQ64 + PQ64x8                     77          0.93         (never reaches it)
    PQ128x4fs + Refine(SQ8), k x 10   337          0.97         29,900 (nprobe 4)
    SQ8                               268          1.00         29,400 (nprobe 4; 0.982)
    PQ128x8 (build-index, 160 MiB)    141          1.00         12,600 (nprobe 4; 0.979)

SQ8 in the lists reaches the target with fewer bytes than fast-scan PQ + re-ranking, at
the same queries/s, and with 4x fewer lists (longer ones, as 10M vectors in 16k lists
have) it is 2.5x faster (the fast-scan k x 10 candidate heap is its slow part). But on
GloVe 100-d word vectors the target takes nprobe 128 of 2,048 lists, and there SQ8
answers 614 queries/s (0.9x exact search) against 9,625 for fast-scan PQ50x4fs +
Refine(SQ8) (docs/benchmarks.md, "Real embeddings"): which codes are faster depends on
how many codes a query must scan, which only the data says. So wherever the budget
(--max-index-memory) holds both, from TRIAL_MIN_VECTORS on, SQ8 (the default) and
PQ{d/2}x4fs + Refine(SQ8) are measured on the training sample (trial.py) and the
faster at the target is built; where only SQ8 fits, SQ8; below that, the most 8-bit PQ
codes that fit (PQ64x8 reaches 0.93 where fast-scan PQ128x4fs, in more bytes, stops at
0.63; PQ128x8 matches SQ8's recall at 0.43x its queries/s), and the manifest says when
their recall is capped. OPQ, SQfp16 and other combinations stay available through
--factory.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from mimdex.infra.errors import DataError, UsageError

MIN_POINTS_PER_CENTROID = 39   # below this faiss warns that k-means is under-trained
MAX_POINTS_PER_CENTROID = 256  # faiss's own training cap
# 8-bit PQ codebooks train on 64 points per centroid (16,384), not faiss's 256: faiss's
# k-means in 2- to 4-d sub-spaces is slow and linear in the points (PQ128x8: 22 s on
# 16,384 points on this project's 2 cores), as for the coarse sample (below)
PQ8_TRAIN_POINTS_PER_CENTROID = 64
# 64 per list, not faiss's cap of 256: 0.002 recall@10 at 200k and 1M (docs/benchmarks.md),
# for a quarter of the k-means time and of the sample's memory
TRAIN_POINTS_PER_CENTROID = 64
ID_BYTES = 8                   # int64 id stored with every code in the inverted lists
HNSW_MIN_NLIST = 8192          # a flat assignment of every vector to 8k+ lists dominates add
HNSW_M = 32
REFINE = ("SQ8", "SQfp16")
# The codes trial (trial.py) runs from this many vectors: below it the default codes
# answer in well under a millisecond whatever the data, and a build stays timing-free
TRIAL_MIN_VECTORS = 100_000
K_FACTOR = 10                  # re-rank k x 10 candidates: k x 4 caps recall@10 at 0.88 at 1M, k x 10 at 0.97
_FACTORY = re.compile(r"(?:OPQ(?P<opq>\d+)(?:_(?P<opq_d>\d+))?,)?IVF(?P<nlist>\d+)(?:_HNSW(?P<hnsw>\d+))?,"
                      r"(?:PQ(?P<m>\d+)(?:x(?P<bits>\d+))?(?P<fs>fs)?|(?P<sq>SQ8|SQfp16))"
                      r"(?:,Refine\((?P<refine>SQ8|SQfp16)\))?")


@dataclass(frozen=True)
class IndexParams:
    factory: str
    nlist: int
    pq_m: int                      # 0 for scalar-quantizer codes
    pq_bits: int
    train_size: int
    code_bytes: int                # bytes per vector in the inverted lists
    estimated_bytes: int
    reasons: tuple[str, ...]
    refine: str | None = None      # codes the top k x k_factor candidates are re-ranked with
    refine_bytes: int = 0
    k_factor: int = 1
    coarse: str = "flat"           # "flat" or "hnsw32"
    code_options: tuple[str, ...] = ()   # codes the trial (trial.py) measures, the default first; () when settled

    def to_dict(self) -> dict:
        out = {**asdict(self), "reasons": list(self.reasons)}
        del out["code_options"]   # the trial's record is in the manifest's training, not its params
        return out


def parse_memory(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"--max-index-memory: cannot read {text!r} (use e.g. 512M, 4G)")
    return int(float(m.group(1)) * 1024 ** "_KMGT".index((m.group(2) or "_").upper()))


def sq_bytes(kind: str, d: int) -> int:
    return d if kind == "SQ8" else 2 * d


@dataclass(frozen=True)
class _Factory:
    nlist: int
    m: int
    bits: int
    code_bytes: int
    refine: str | None
    coarse: str


def _parse_factory(factory: str, d: int) -> _Factory:
    m = _FACTORY.fullmatch(factory.replace(" ", ""))
    if not m:
        raise UsageError(f"--factory {factory!r}: expected an IVF factory string such as IVF1024,PQ64x4fs, "
                         "IVF65536_HNSW32,PQ128x4fs,Refine(SQ8), OPQ64_256,IVF4096,PQ64x8 or IVF4096,SQ8")
    if m["sq"]:
        pq_m, bits, code = 0, 8, sq_bytes(m["sq"], d)
    else:
        pq_m, bits = int(m["m"]), int(m["bits"] or 8)
        if d % pq_m:
            raise UsageError(f"--factory {factory!r}: PQ{pq_m} does not divide the dimension {d}")
        code = math.ceil(pq_m * bits / 8)
    if m["opq"] and int(m["opq_d"] or d) != d:
        raise UsageError(f"--factory {factory!r}: OPQ must keep the dimension {d} (write OPQ{m['opq']}_{d})")
    return _Factory(int(m["nlist"]), pq_m, bits, code, m["refine"], f"hnsw{m['hnsw']}" if m["hnsw"] else "flat")


def _default_nlist(n: int, reasons: list[str]) -> int:
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    if nlist > cap:
        nlist = 2 ** int(math.log2(cap))
        reasons.append(f"nlist {nlist}: the power of two nearest 4*sqrt(n), capped so that each "
                       f"centroid gets >= {MIN_POINTS_PER_CENTROID} training points")
    else:
        reasons.append(f"nlist {nlist}: the power of two nearest 4*sqrt(n) = {4 * math.sqrt(n):.0f} "
                       "(faiss guideline 4..16*sqrt(n))")
    return nlist


def _default_codes(n: int, d: int, nlist: int, max_memory: int | None, reasons: list[str]) -> tuple[str, ...]:
    """The list codes the budget allows, the default first: SQ8, and fast-scan PQ re-ranked
    with SQ8 where that fits too (the codes trial measures which is faster on the data);
    else the largest 8-bit PQ that fits."""
    coarse = nlist * d * 4
    per_vector = (max_memory - coarse) / max(n, 1) - ID_BYTES if max_memory else math.inf
    if sq_bytes("SQ8", d) <= per_vector:
        reasons.append(f"SQ8 codes ({d} bytes): at 1M x 256 they reach recall@10 1.00 where fast-scan PQ stops at "
                       "0.63, with fewer bytes than PQ + SQ8 re-ranking at the same queries/s (docs/benchmarks.md)")
        m = max(x for x in range(1, d // 2 + 1) if d % x == 0)
        fast = f"PQ{m}x4fs,Refine(SQ8)"
        if n >= TRIAL_MIN_VECTORS and math.ceil(m / 2) + sq_bytes("SQ8", d) <= per_vector:
            return "SQ8", fast
        return ("SQ8",)
    per_vector -= 2 ** 8 * d * 4 / max(n, 1)   # the PQ centroids
    fits = [m for m in range(d // 2, 0, -1) if d % m == 0 and m <= per_vector]
    if not fits:
        raise UsageError(f"--max-index-memory {max_memory} bytes is too small for {n} vectors: even "
                         f"PQ1x8 needs {n * (ID_BYTES + 1) + coarse + 2 ** 8 * d * 4} bytes")
    reasons.append(f"PQ{fits[0]}x8: --max-index-memory leaves {per_vector:.1f} bytes per vector, too few for SQ8 "
                   f"({d} bytes); the most 8-bit PQ codes that fit: the fewer, the lower their recall@10 cap (at "
                   "1M x 256, nprobe 4: PQ128x8 0.979 as SQ8; PQ64x8 stops at 0.93, fast-scan PQ128x4fs at 0.63)")
    return (f"PQ{fits[0]}x8",)


def choose(n: int, d: int, max_memory: int | None = None, factory: str | None = None,
           train_size: int | None = None, codes: tuple[str, str] | None = None) -> IndexParams:
    """``codes``: (list codes, why), the codes trial's choice among a first call's code_options."""
    reasons: list[str] = []
    options: tuple[str, ...] = ()
    if factory:
        f = _parse_factory(factory, d)
        factory = factory.replace(" ", "")
        reasons.append(f"explicit --factory {factory}")
    else:
        nlist = _default_nlist(n, reasons)
        coarse = f"hnsw{HNSW_M}" if nlist >= HNSW_MIN_NLIST else "flat"
        if coarse != "flat":
            reasons.append(f"HNSW{HNSW_M} coarse quantizer: nlist >= {HNSW_MIN_NLIST}, where assigning each vector "
                           "to its list by a flat scan of the centroids dominates add and search")
        options = _default_codes(n, d, nlist, max_memory, reasons)
        if codes is not None:   # the trial's reason replaces the codes' (_default_codes appends it last)
            reasons[-1] = codes[1]
        factory = f"IVF{nlist}{'_HNSW%d' % HNSW_M if coarse != 'flat' else ''},{codes[0] if codes else options[0]}"
        f = _parse_factory(factory, d)
    # the sample is drawn before the trial: large enough for every option's codebooks
    pq_train = max(_pq_train(_parse_factory(f"IVF{f.nlist},{o}", d)) for o in options) if options else _pq_train(f)
    needed = max(f.nlist, 2 ** f.bits if f.m else 1)
    if n < needed:
        raise DataError(f"{n} vectors are too few to train {factory}: it needs at least {needed} "
                        f"({f.nlist} IVF lists" + (f", {2 ** f.bits} PQ centroids per sub-quantizer)" if f.m else ")"))
    if train_size:
        train_size = min(n, train_size)
        reasons.append(f"training sample {train_size}: --train-size")
    else:
        train_size = min(n, max(TRAIN_POINTS_PER_CENTROID * f.nlist, pq_train))
        reasons.append(f"training sample {train_size}: min(n, {TRAIN_POINTS_PER_CENTROID} * nlist) (faiss's guideline "
                       f"is 39..256 per list; 64 costs 0.002 recall@10 against 256)"
                       + (f", and at least the {pq_train} points PQ training samples" if pq_train else ""))
    refine_bytes = sq_bytes(f.refine, d) if f.refine else 0
    estimated = n * (f.code_bytes + refine_bytes + ID_BYTES) + f.nlist * d * 4 + (2 ** f.bits) * d * 4
    if max_memory and estimated > max_memory:
        raise UsageError(f"{factory} needs about {estimated} bytes for {n} vectors, over --max-index-memory "
                         f"{max_memory}")
    return IndexParams(factory, f.nlist, f.m, f.bits, train_size, f.code_bytes, estimated, tuple(reasons),
                       f.refine, refine_bytes, K_FACTOR if f.refine else 1, f.coarse,
                       options if codes is None and len(options) > 1 else ())


def _pq_train(f: _Factory) -> int:
    """Points PQ training samples (0 for scalar quantizers)."""
    return 2 ** f.bits * (PQ8_TRAIN_POINTS_PER_CENTROID if f.bits == 8 else MAX_POINTS_PER_CENTROID) if f.m else 0
