"""The C allocator on CPU: freed tensors go back to the operating system.

glibc serves a block larger than its mmap threshold with its own mapping, returned to the system when
freed; smaller blocks come from the heap, which keeps what is freed. The threshold starts at 128 KiB
but rises to the size of the largest mapped block freed so far (up to 32 MiB), so after the first
few steps of a request most activation and logits tensors come from the heap, and the heap holds on
to the largest working set any phase ever needed while later phases add their own: on SmolLM2-135M
a forget request's resident memory stayed ~1 GB higher after training than before it, and its peak
was ~2x what a fixed threshold gives (docs/BENCHMARKS.md, "Memory planner").

Fixing the threshold (mallopt M_MMAP_THRESHOLD, which also stops it from moving) keeps large blocks
mapped. `MALLOC_MMAP_THRESHOLD_` in the environment wins: it is the documented glibc way, and a user
who set it chose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger("icu_peft")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 64 * 1024

_done = False


def return_freed_memory_to_os(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (once); False where it does not apply (not glibc,
    not Linux, or the environment already sets it)."""
    global _done
    if _done or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    _done = ok
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok
