"""Giving freed memory back to the operating system.

glibc's malloc keeps freed heap memory for reuse; after a large working set is let go
(a training sample, an embeddings part's arrays) the process's RSS stays where it was.
``malloc_trim(0)`` returns the free pages of every arena (glibc >= 2.8 also the pages in
the middle of the heap). Elsewhere (another C library) it does nothing.
"""
from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    trim = _trim()
    if trim is not None:
        trim(0)
