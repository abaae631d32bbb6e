"""bitsandbytes without compiled code from the Hugging Face Hub.

On a CPU with AVX512-BF16, importing bitsandbytes (0.48+) asks the `kernels` package (which transformers 5
installs) for "kernels-community/quantization-bitsandbytes", a compiled 4-bit CPU kernel on the Hub: a
download and execution of code at run time, and on a machine without network two connection attempts,
one with no timeout, at every first load of a 4-bit model. icu-peft fetches nothing unless the user names a
hub id, so its first import of bitsandbytes refuses that fetch; bitsandbytes then runs its own CPU kernels
(and icu-peft's dense copies of the frozen weights do most of the 4-bit work on a CPU anyway).
`ICU_PEFT_HUB_KERNELS=1` lets bitsandbytes fetch it.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
ALLOW_ENV = "ICU_PEFT_HUB_KERNELS"


class HubKernelRefused(RuntimeError):
    pass


def import_bitsandbytes():
    """`import bitsandbytes`, the first time with its hub kernel refused (see the module's docstring).
    Raises ImportError where bitsandbytes is not installed."""
    return import_refusing_hub_kernel("bitsandbytes")


def import_refusing_hub_kernel(name: str):
    """Import module `name` with `kernels.get_kernel` refusing HUB_KERNEL while it runs (not at all where
    the module is imported already or ALLOW_ENV is set)."""
    if name in sys.modules or os.environ.get(ALLOW_ENV) == "1":
        return importlib.import_module(name)
    try:
        kernels = importlib.import_module("kernels")
    except ImportError:  # nothing to fetch with
        return importlib.import_module(name)
    real = kernels.get_kernel

    def get_kernel(repo_id, *args, **kwargs):
        if str(repo_id).startswith(HUB_KERNEL):
            raise HubKernelRefused(f"icu-peft does not fetch code from the Hub ({ALLOW_ENV}=1 allows it)")
        return real(repo_id, *args, **kwargs)

    kernels.get_kernel = get_kernel  # bitsandbytes reads it with `from kernels import get_kernel` at import
    try:
        return importlib.import_module(name)
    finally:
        kernels.get_kernel = real


def quiet_refused_kernel() -> None:
    """Drop bitsandbytes' warning that its hub kernel could not be loaded: refused here on purpose (or,
    offline, unreachable), with the same results from its own kernel; every other message still shows."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: HUB_KERNEL not in str(record.msg))
