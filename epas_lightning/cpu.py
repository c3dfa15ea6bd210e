"""CPU-side tuning: keep large tensors in glibc's heap instead of fresh mmaps that page-fault on every step."""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc mallopt parameters


def tune_glibc_malloc(mmap_threshold: int = 1 << 32, trim_threshold: int = 1 << 34, top_pad: int = 1 << 30) -> bool:
    """Make glibc serve large allocations from its heap and keep freed memory for reuse.

    By default glibc maps every block above ~32 MiB afresh and returns it on free, so a training step that allocates
    attention matrices or logits of that size pays page faults for each one (measured in ``benchmarks/RESULTS.md``).
    Equivalent to ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_``; the process keeps its
    peak memory instead of returning it. Returns False where glibc is not the allocator.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    return all(mallopt(param, ctypes.c_int(min(value, 2**31 - 1))) == 1 for param, value in settings)
