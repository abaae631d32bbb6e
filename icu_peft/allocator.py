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
import functools
import logging
import os
import sys
from contextlib import contextmanager

logger = logging.getLogger("icu_peft")

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
THRESHOLD_BYTES = 64 * 1024

_done = False
_fixed = THRESHOLD_BYTES  # the threshold return_freed_memory_to_os set
_depth = 0  # heap_blocks nesting


@functools.lru_cache(maxsize=None)
def _libc():
    """The C library, loaded once (find_library asks the system linker's cache: not for every step)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def return_freed_memory_to_os(threshold: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process (once); False where it does not apply (not glibc,
    not Linux, or the environment already sets it)."""
    global _done, _fixed
    if _done or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        ok = bool(_libc().mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold)))
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    _done, _fixed = ok, threshold
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok


# glibc's largest mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
HEAP_BLOCKS_BYTES = 32 * 1024 * 1024


@contextmanager
def heap_blocks(threshold: int = HEAP_BLOCKS_BYTES):
    """Within: blocks up to `threshold` bytes come from the heap again, where a freed block is reused
    without the kernel; on leaving, the fixed threshold is back and malloc_trim hands the freed heap
    pages back to the system (so the phase's working set is not kept, the reason for the fixed threshold).

    For phases that allocate and free the same mid-sized tensors thousands of times: greedy roll-outs grow
    each layer's KV cache by one position per token (a new tensor each time), and with every block over
    64 KiB mapped afresh the kernel zeroed and faulted in every page of it: three never-seen records' EL10
    took 45-53 s, 9-10 s of it system time, against 37-39 s and under 1 s within this (docs/BENCHMARKS.md,
    "CPU speed"). A no-op where return_freed_memory_to_os did not fix the threshold (not glibc, or the
    environment chose)."""
    global _depth
    if not _done or _depth:  # not fixed here, or already inside
        yield
        return
    libc = _libc()
    libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(threshold))
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(_fixed))
        libc.malloc_trim(ctypes.c_size_t(0))
