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
from typing import Callable, Optional

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


def _status_bytes(field: str) -> Optional[int]:
    """A `/proc/self/status` memory field in bytes (None where there is no such file or field)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# cpu_heap_steps 'auto': the steps take their blocks from the heap when the memory available after the first
# step holds this many times that step's peak above the memory resident before it (the heap keeps about one
# step's freed blocks: SmolLM2-135M, 4-bit, one view, a 2-step request peaked 592 MB higher with it, the plan's
# step 626 MB; two of them and a step's worth to spare)
HEAP_AUTO_MARGIN = 3.0


class HeapSteps:
    """Whether training steps run inside heap_blocks (the `cpu_heap_steps` setting: True, False or 'auto').

    'auto' decides once, from a measurement: the first step runs with the fixed threshold, and its peak
    above the memory resident before it (the process's high-water mark, VmHWM, an upper bound where an
    earlier phase peaked higher) sets what the heap may keep. The later steps take their blocks from the
    heap when the memory available then holds HEAP_AUTO_MARGIN such peaks: on the CPU a step that maps
    every block afresh spends much of its time in page faults (a GPT-NeoX 3 x 160 request: 109 s with 50 s
    of system time, 62 s with the heap; SmolLM2's quick demo: a step 8.3 -> 4.7 s). Never on CUDA (the
    activations live on the device), nor where return_freed_memory_to_os did not fix the threshold."""

    def __init__(self, setting, device_type: str):
        auto = setting == "auto"
        self.on = bool(setting) and not auto
        self.pending = auto and device_type == "cpu" and _done  # the first step is still to be measured
        self._before: Optional[int] = None

    def begin(self) -> bool:
        """Before a step: whether it runs inside heap_blocks."""
        if self.pending:
            self._before = _status_bytes("VmRSS")
        return self.on

    def after_step(self, available: Callable[[], int]) -> Optional[str]:
        """After a step: 'auto' decides, once, from what that step took. Returns the verdict in words the
        one time it is made (for the log), else None."""
        if not self.pending:
            return None
        self.pending = False
        peak = _status_bytes("VmHWM")
        if self._before is None or peak is None:
            return "off (this system does not report its resident memory)"
        step = max(peak - self._before, 0)
        free = available()
        self.on = free >= HEAP_AUTO_MARGIN * step
        return (f"{'on' if self.on else 'off'}: a step's peak {step / 2**20:.0f} MB over the resident memory, "
                f"{free / 2**20:.0f} MB available")
