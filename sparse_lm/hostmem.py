"""Host-memory settings for training on a CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("sparse_lm")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP = (1 << 30, (1 << 31) - 1)  # (mmap threshold, trim threshold) for training: map only blocks over 1 GB, never trim


def set_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """glibc's mallopt for both thresholds; False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    except (OSError, AttributeError, TypeError):
        return False


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to reuse freed memory instead of handing large blocks back to the system.

    Above its mmap threshold (at most 32 MB) malloc maps every allocation afresh and unmaps it on free, so a
    tensor of that size, e.g. the tiny preset's 4096 × 2048 logits and their gradients, page-faults in anew
    every step: measured at a sixth of a CPU training step. Raising the threshold keeps such blocks in the heap.
    Peak memory is unchanged; freed memory is kept for reuse. Returns False where there is no glibc.
    """
    ok = set_malloc(*KEEP)
    if not ok:
        log.debug("hostmem: mallopt unavailable; large CPU tensors are mapped afresh each time")
    return ok
