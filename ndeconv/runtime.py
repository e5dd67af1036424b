"""CPU runtime settings that change speed, never results.

PyTorch's CPU tensors come from glibc's ``malloc``, which serves every block over its mmap threshold (at
most 32 MB) with a fresh ``mmap`` and gives it back with ``munmap`` when freed. A training step allocates
and frees the same large buffers every step (a deconvolution layer's sampled-patch matrices are 60-130 MB
at batch 128), so every step pays the kernel to map, zero-fill and unmap them again: one minor page fault
per 4 KB, measured here as the larger half of a 49x49-by-15488 batched product's time. Serving every
allocation from the heap and never trimming it makes the next step reuse the same pages: on this 2-core
CPU 9-39% off the training steps of five zoo networks, deconvolution and BatchNorm (README allocator table:
benchmarks/results/allocator_default.json against the all_archs results).
The cost: the process keeps its peak memory mapped until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse (no ``mmap`` per large block, no trimming).

    Affects the whole process from the next allocation on; bit-identical results. Returns whether it took
    effect: ``False`` off Linux or under a C library without glibc's ``mallopt`` (e.g. musl), where nothing
    changes. ``ndeconv train`` calls it unless ``--keep-freed-memory false``; call it at the start of your own
    CPU training loop for the same speed-up.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success. A trim threshold of -1 disables trimming (mallopt(3)).
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, -1) == 1
    return _applied
