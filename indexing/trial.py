"""Which codes go in the lists, measured on the training sample where more than one fits.

SQ8 in the lists, or fast-scan PQ (d/2 sub-quantizers of 4 bits) re-ranked with SQ8: which
answers faster at the recall target depends on how many codes a query must scan to reach
it, which only the data says. On the clustered 256-d benchmark vectors nprobe 4 of 4,096
lists reaches recall@10 0.95 and SQ8 is as fast (1M) or 2.5x faster (longer lists); on
GloVe 100-d word vectors (bench_real.py) 0.95 takes nprobe 64-128 of 2,048, and at 64 SQ8
answers 1,150 queries/s against 20,040 for the fast-scan codes (docs/benchmarks.md).

The trial is a scaled model of the index: TRIAL_ROWS sample rows in as many lists as
make them as long as the index's (n / nlist vectors), every option on the same coarse
centroids; the held-out queries, their exact nearest neighbour among those rows, nprobe
doubled until recall@10 reaches the target, and the queries/s there. It takes a few
seconds at any n. Fewer lists than the index's means fewer probes to the target, so the
trial under-counts the codes a query scans: it errs towards the default, as does PREFER.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from mimdex.indexing.evaluate import FLAT_STEPS, PAYS
from mimdex.indexing.exact import exact_search
from mimdex.indexing.params import choose
from mimdex.indexing.train import IVF_NITER, coarse_centroids, train_index
from mimdex.infra.contracts.recall import recall_at

TRIAL_ROWS = 65_536
# Another option replaces the default (the first) only when it answers this many times
# faster: near-ties keep the default, so timing noise does not change a build's codes.
PREFER = 1.5
TIMED_RUNS = 3       # queries/s: the best of this many searches of the held-out queries


@dataclass(frozen=True)
class CodesTrial:
    codes: str
    nprobe: int            # the smallest doubling whose recall@10 reaches the target, else the best
    recall10: float
    qps: float
    reached: bool

    def to_dict(self) -> dict:
        return asdict(self)


def trial_nlist(n: int, nlist: int, rows: int) -> int:
    """Lists of the trial index: as many as make its lists as long as the index's."""
    return max(1, min(nlist, round(rows * nlist / max(n, 1))))


def measure(index: faiss.Index, codes: str, held: np.ndarray, truth: np.ndarray, target: float,
            k_factor: int) -> CodesTrial:
    """Sweep nprobe on a filled trial index (ids 0..rows-1; truth: each query's nearest row)."""
    ivf = faiss.extract_index_ivf(index)
    params = faiss.IndexRefineSearchParameters(k_factor=k_factor) if isinstance(index, faiss.IndexRefine) else None
    rows, nprobe, flat = [], 1, 0
    while nprobe <= ivf.nlist:
        ivf.nprobe = nprobe
        _, found = index.search(held, 10, params=params)
        rows.append((nprobe, recall_at(found, truth, (10,))["recall@10"]))
        flat = flat + 1 if len(rows) > 1 and rows[-1][1] - rows[-2][1] < PAYS else 0
        if rows[-1][1] >= target or flat >= FLAT_STEPS:
            break
        nprobe *= 2
    hit = next((r for r in rows if r[1] >= target), None)
    nprobe, recall = hit or max(rows, key=lambda r: (r[1], -r[0]))
    ivf.nprobe = nprobe
    best = np.inf
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        index.search(held, 10, params=params)
        best = min(best, time.perf_counter() - t0)
    return CodesTrial(codes, nprobe, recall, round(len(held) / best, 1), hit is not None)


def pick(trials: list[CodesTrial]) -> tuple[CodesTrial, str]:
    """The fastest option at the target, unless the default (the first) reaches it too and
    is within PREFER of it; with none at the target, the highest recall@10."""
    default, reached = trials[0], [t for t in trials if t.reached]
    if not reached:
        return max(trials, key=lambda t: t.recall10), "no option reaches the target on the trial: the highest recall@10"
    fastest = max(reached, key=lambda t: t.qps)
    if default.reached and fastest.qps < PREFER * default.qps:
        return default, f"no option answers {PREFER}x faster than the default at the target"
    return fastest, (f"{fastest.qps / default.qps:.1f}x the default's queries/s" if default.reached
                     else "the default does not reach the target on the trial")


def choose_codes(sample: np.ndarray, held: np.ndarray, options: tuple[str, ...], n: int, nlist: int,
                 target: float, seed: int = 0) -> tuple[str, str, tuple[CodesTrial, ...]]:
    """(codes, why, every option's trial) for an index of n vectors in nlist lists."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows = np.ascontiguousarray(sample[np.sort(rng.permutation(len(sample))[:TRIAL_ROWS])], dtype=np.float32)
    held = np.ascontiguousarray(held, dtype=np.float32)
    truth = exact_search(held, [(rows, np.arange(len(rows)))], 1)[1][:, 0]
    lists = trial_nlist(n, nlist, len(rows))
    coarse = coarse_centroids(rows, lists, IVF_NITER, seed)
    trials = []
    for codes in options:
        p = choose(len(rows), rows.shape[1], factory=f"IVF{lists},{codes}", train_size=len(rows))
        index, _ = train_index(rows, p, seed, coarse)
        index.add(rows)
        trials.append(measure(index, codes, held, truth, target, p.k_factor))
        del index
    chosen, why = pick(trials)
    why = (f"{chosen.codes} codes, from a trial on {len(rows)} sample rows in {lists} lists (as long as the index's; "
           f"indexing/trial.py, {time.perf_counter() - t0:.1f} s): "
           + "; ".join(f"{t.codes} recall@10 {t.recall10} at nprobe {t.nprobe}, {t.qps:.0f} queries/s" for t in trials)
           + f". {why}")
    return chosen.codes, why, tuple(trials)
