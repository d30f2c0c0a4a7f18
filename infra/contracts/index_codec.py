"""The stored form of an index: the trained (empty) index once per version, and each
shard's inverted lists as faiss writes them (flat codes + int64 ids). Together they make
a complete faiss index (``shard_index``).

An index with a re-ranking stage is trained as faiss's ``IndexRefine`` (the IVF it
searches + the quantizer of the re-ranking codes, one file). Its re-ranking codes are
not in the inverted lists: they are a column of the shard's id map (index_version,
``REFINE_COLUMN``), so deletions, deltas and compaction carry them with the id.
"""
from __future__ import annotations

import contextlib

import io
from typing import Callable, Iterator

import faiss
import numpy as np

CHUNK_BYTES = 1 << 24   # a shard's lists go to its writer 16 MB at a time


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8), faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)
    without_pq_tables(index)
    return index


def without_pq_tables(index: faiss.Index) -> None:
    """8-bit IVFPQ without faiss's precomputed distance tables. faiss builds them at train
    and load when they take under 2 GB: nlist x M x 256 floats, 537 MB for IVF4096,PQ128x8,
    held by every reader and Beam worker but counted in no index's bytes, and 4x the codes
    of a 1M-vector index within a 160 MB budget. Without them each probed list computes
    its own table (M x 256 x 2 flops). Fast-scan PQ keeps its small table (M x 16 a list)."""
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:   # not an IVF
        return
    if isinstance(ivf, faiss.IndexIVFPQFastScan):
        if ivf.by_residual and ivf.is_trained:
            ivf.precompute_table()
    elif isinstance(ivf, faiss.IndexIVFPQ):
        ivf.use_precomputed_table = -1


def searched(index: faiss.Index) -> faiss.Index:
    """The index a search scans: an IndexRefine's base, else the index itself. The base
    keeps a reference to its owner, which frees it (see lists_shape)."""
    if isinstance(index, faiss.IndexRefine):
        base = faiss.downcast_index(index.base_index)
        base.referenced_objects = [index]  # faiss's own way to keep an owner alive
        return base
    return index


def refine_quantizer(index: faiss.Index) -> faiss.Index | None:
    """The quantizer of the re-ranking codes (sa_encode / sa_decode), or None."""
    if not isinstance(index, faiss.IndexRefine):
        return None
    refine = faiss.downcast_index(index.refine_index)
    refine.referenced_objects = [index]
    return refine


def lists_shape(trained: bytes | faiss.Index) -> tuple[int, int]:
    """(nlist, code size) of a trained IVF index, as plain ints.

    faiss's ``extract_index_ivf`` returns a pointer into its argument without keeping it
    alive: taken from a temporary index it dangles, and reads garbage once the memory is
    reused (seen under load as a shard of "1 list of 11-byte codes"). Callers get numbers
    from here instead of holding that pointer.
    """
    index = deserialize(trained) if isinstance(trained, (bytes, bytearray)) else trained
    ivf = faiss.extract_index_ivf(index)
    return int(ivf.nlist), int(ivf.code_size)


def coarse_bytes(nlist: int) -> int:
    """Bytes faiss's IVF sa_encode puts before each code for its list number."""
    nbytes, nl = 0, nlist - 1
    while nl > 0:
        nbytes, nl = nbytes + 1, nl >> 8
    return nbytes


def split_codes(nlist: int, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """faiss IVF sa_encode output -> (list numbers, PQ codes)."""
    cb = coarse_bytes(nlist)
    lists = np.zeros(len(codes), np.int64)
    for b in range(cb):
        lists |= codes[:, b].astype(np.int64) << (8 * b)
    return lists, np.ascontiguousarray(codes[:, cb:])


def encode(trained: faiss.Index, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(list numbers, list codes, re-ranking codes or None) of vectors under a trained index.

    The same bits on every runner: faiss's coarse assignment (BLAS) rounds near-ties
    differently with the OpenMP thread count (1 row in 10,000 moved list between 1 and 2
    threads at 200k x 256, IVF2048), so it runs on one thread, where faiss cuts the batch
    into the same 4096-row blocks whatever the machine. A Flink slot's or a Dask worker's
    process has one core's share anyway."""
    with one_omp_thread():
        return _encode(trained, vectors)


@contextlib.contextmanager
def one_omp_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _encode(trained: faiss.Index, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    ivf = faiss.extract_index_ivf(trained)
    refine = refine_quantizer(trained)
    rsize = refine.sa_code_size() if refine is not None else 0
    if not len(vectors):
        return (np.zeros(0, np.int64), np.zeros((0, ivf.code_size), np.uint8),
                np.zeros((0, rsize), np.uint8) if refine is not None else None)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    base = searched(trained)
    lists, codes = split_codes(ivf.nlist, base.sa_encode(x))
    return lists, codes, (refine.sa_encode(x) if refine is not None else None)


def _fourcc(code: str) -> int:
    return int.from_bytes(code.encode("ascii"), "little")


def encoded_lists(nlist: int, code_size: int, ids: np.ndarray, lists: np.ndarray, codes: np.ndarray) -> bytes:
    """(id, list number, code) rows -> faiss inverted lists, serialised (encoded_chunks, joined)."""
    return b"".join(encoded_chunks(nlist, code_size, ids, lists, codes))


def encoded_chunks(nlist: int, code_size: int, ids: np.ndarray, lists: np.ndarray, codes: np.ndarray,
                   chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """(id, list number, code) rows -> faiss inverted lists, serialised, as a stream of
    chunks of about ``chunk_bytes`` for a writer to pass on: lists_header, then the rows'
    list_chunks. A writer that has the rows a few lists at a time (build-index's merge)
    calls those two itself.

    Stored flat (faiss ArrayInvertedLists' format, byte for byte what faiss's
    write_InvertedLists writes, which tests check): the quantizer and codebooks are in
    trained.index, once, and fast-scan's 32-code blocks are rebuilt when a reader loads the
    shard. Streamed list by list: faiss's own path copies a shard's codes four more times
    (the lists, its writer, the array, the bytes), and even one whole buffer is 660 MB for
    a 2.5M-vector SQ8 shard.
    """
    yield lists_header(nlist, code_size, np.bincount(lists, minlength=nlist))
    yield from list_chunks(code_size, ids, lists, codes, chunk_bytes)


def lists_header(nlist: int, code_size: int, sizes: np.ndarray) -> bytes:
    """The head of stored inverted lists: shape and every list's size (``sizes``, nlist long)."""
    sizes = np.asarray(sizes).astype(np.uint64)
    nonempty = np.flatnonzero(sizes)
    if len(nonempty) > nlist / 2:  # faiss: a "full" size table, else a sparse one of (list, size)
        kind, table = "full", sizes
    else:
        kind, table = "sprs", np.stack([nonempty.astype(np.uint64), sizes[nonempty]], 1).ravel()
    return (np.array([_fourcc("ilar")], np.uint32).tobytes() + np.array([nlist, code_size], np.uint64).tobytes()
            + np.array([_fourcc(kind)], np.uint32).tobytes() + np.array([len(table)], np.uint64).tobytes()
            + table.astype(np.uint64).tobytes())


def list_chunks(code_size: int, ids: np.ndarray, lists: np.ndarray, codes: np.ndarray,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The stored body of whole lists (every row of each list in ``lists``, in any order):
    list by list in list order, each list's codes then its ids, rows by id so a re-run
    writes the same bytes. Successive calls on successive list ranges continue one body."""
    order = np.lexsort((ids, lists))
    sorted_lists = lists[order]
    bounds = np.append(np.flatnonzero(np.diff(sorted_lists, prepend=-1)), len(order))
    codes = codes.reshape(len(ids), code_size)
    buf = bytearray()
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        rows = order[a:b]
        buf += codes[rows].tobytes()
        buf += ids[rows].astype(np.int64).tobytes()
        if len(buf) >= chunk_bytes:
            yield bytes(buf)
            buf = bytearray()
    if buf:
        yield bytes(buf)


def _read_lists(data: "bytes | Callable[[int], bytes]"):
    """faiss inverted lists from their bytes, or from a read(n) callback that streams them
    (faiss pulls 1 MB at a time: a shard's lists are never in memory twice)."""
    read = io.BytesIO(data).read if isinstance(data, (bytes, bytearray)) else data
    reader = faiss.PyCallbackIOReader(read)
    try:
        return faiss.downcast_InvertedLists(faiss.read_InvertedLists(reader))
    except RuntimeError as exc:
        raise ValueError(f"not faiss inverted lists: {str(exc).splitlines()[0]}") from exc


def decoded_lists(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of encoded_lists: (ids, list numbers, PQ codes) of a stored shard."""
    flat = _read_lists(data)
    ids, lists, codes = [], [], []
    for lst in range(flat.nlist):
        n = flat.list_size(lst)
        if n:
            ids.append(faiss.rev_swig_ptr(flat.get_ids(lst), n).copy())
            codes.append(faiss.rev_swig_ptr(flat.get_codes(lst), n * flat.code_size).copy().reshape(n, -1))
            lists.append(np.full(n, lst, np.int64))
    if not ids:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, flat.code_size), np.uint8)
    return np.concatenate(ids), np.concatenate(lists), np.concatenate(codes)


def shard_index(trained: bytes, lists: "bytes | Callable[[int], bytes]") -> faiss.Index:
    """trained.index + a shard's inverted lists (bytes, or a read(n) callback streaming
    them) -> a complete, searchable faiss index (the IVF of an IndexRefine: the reader
    re-ranks with the id map's codes)."""
    index = searched(deserialize(trained))
    flat = _read_lists(lists)
    ivf = faiss.extract_index_ivf(index)
    if flat.nlist != ivf.nlist or flat.code_size != ivf.code_size:
        raise ValueError(f"inverted lists ({flat.nlist} lists of {flat.code_size}-byte codes) do not fit the "
                         f"trained index ({ivf.nlist}, {ivf.code_size})")
    dst = faiss.downcast_InvertedLists(ivf.invlists)
    if type(dst) is type(flat):  # the stored form is the index's own: hand the lists over, uncopied
        ivf.replace_invlists(flat, True)
        flat.this.disown()   # the index owns and frees them now
        ivf.ntotal = index.ntotal = sum(ivf.invlists.list_size(i) for i in range(ivf.nlist))
        return index
    packer = ivf.get_CodePacker() if isinstance(dst, faiss.BlockInvertedLists) else None
    for lst in range(flat.nlist):
        n = flat.list_size(lst)
        if not n:
            continue
        if packer is None:
            dst.add_entries(lst, n, flat.get_ids(lst), flat.get_codes(lst))
            continue
        # BlockInvertedLists.add_entries into an empty list copies whole packed blocks
        codes = faiss.rev_swig_ptr(flat.get_codes(lst), n * ivf.code_size)
        nblocks = (n + packer.nvec - 1) // packer.nvec
        padded = np.zeros(nblocks * packer.nvec * ivf.code_size, np.uint8)
        padded[: len(codes)] = codes
        packed = np.empty(nblocks * packer.block_size, np.uint8)
        for b in range(nblocks):
            packer.pack_all(faiss.swig_ptr(padded[b * packer.nvec * ivf.code_size:]),
                            faiss.swig_ptr(packed[b * packer.block_size:]))
        dst.add_entries(lst, n, flat.get_ids(lst), faiss.swig_ptr(packed))
    ivf.ntotal = sum(flat.list_size(i) for i in range(flat.nlist))
    index.ntotal = ivf.ntotal
    return index


def append_lists(dst: faiss.Index, src: faiss.Index) -> None:
    """``dst.merge_from(src, 0)``: src's lists appended to dst's (src left empty), ids as
    they are. faiss's BlockInvertedLists.add_entries (fast-scan's packed lists), appending
    to a list whose size is a multiple of its block's bytes, copies as many blocks as the
    joined list holds from a source that holds only the new ones: a heap overrun (faiss
    1.15; a 10M-vector IVF16384 PQ16x4fs index aborted while its four shards merged). Any
    list whose size fills whole blocks is joined here first, as the concatenation of both
    lists' blocks; faiss appends the rest code by code, correctly."""
    dl = faiss.downcast_InvertedLists(faiss.extract_index_ivf(dst).invlists)
    sl = faiss.downcast_InvertedLists(faiss.extract_index_ivf(src).invlists)
    if isinstance(dl, faiss.BlockInvertedLists):
        nvec, block = dl.n_per_block, dl.block_size
        for lst in range(dl.nlist):
            o, n = dl.list_size(lst), sl.list_size(lst)
            if not n or not o or o % nvec:
                continue
            ids = np.concatenate([faiss.rev_swig_ptr(dl.get_ids(lst), o), faiss.rev_swig_ptr(sl.get_ids(lst), n)])
            codes = np.concatenate([faiss.rev_swig_ptr(dl.get_codes(lst), o // nvec * block),
                                    faiss.rev_swig_ptr(sl.get_codes(lst), -(-n // nvec) * block)])
            dl.resize(lst, 0)
            sl.resize(lst, 0)   # merge_from skips it; its count still moves with src.ntotal
            dl.add_entries(lst, o + n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    dst.merge_from(src, 0)
