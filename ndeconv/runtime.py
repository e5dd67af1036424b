"""CPU runtime settings that change speed, never results.

PyTorch's CPU tensors come from glibc's ``malloc``, which serves every block over its mmap threshold (at
most 32 MB) with a fresh ``mmap`` and gives it back with ``munmap`` when freed. A training step allocates
and frees the same large buffers every step (a deconvolution layer's sampled-patch matrices are 60-130 MB
at batch 128), so every step pays the kernel to map, zero-fill and unmap them again: one minor page fault
per 4 KB, measured here as the larger half of a 49x49-by-15488 batched product's time. Serving every
allocation from the heap and never trimming it makes the next step reuse the same pages: on this 2-core
CPU 9-39% off the training steps of five zoo networks, deconvolution and BatchNorm (docs/benchmarks.md, allocator table:
benchmarks/results/allocator_default.json against the all_archs results).
The cost: the process keeps its peak memory mapped until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from pathlib import Path

import torch

__all__ = ["cpu_model_name", "keep_freed_memory", "native_amp_dtype"]

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


def native_amp_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype ``device`` computes natively, or ``None`` where reduced precision would only be emulated.

    CUDA: float16 (every CUDA GPU; ``ndeconv train`` pairs it with a GradScaler). CPU: bfloat16 where oneDNN has
    bf16 kernels (AVX512-BF16 or AMX, e.g. Intel Sapphire Rapids); elsewhere (AVX2 CPUs such as the AMD EPYC of
    this project's CI) PyTorch falls back to generic loops: measured on that CPU, a bf16 autocast training step of
    the BatchNorm ResNet-18 takes several times as long as its float32 step (docs/layers.md, Mixed precision).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu":
        cpu = torch.cpu
        native = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                        "_is_amx_tile_supported"))
        return torch.bfloat16 if native else None
    return None


def cpu_model_name() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it (e.g. "Intel(R) Xeon(R) Processor", "AMD EPYC 9R14"), else
    what ``platform`` knows (another OS): what a training run's epoch rows and the benchmark results record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
