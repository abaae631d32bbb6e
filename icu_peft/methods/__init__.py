"""Unlearning methods as units: each module holds its forget loss and its config preset.

`METHODS` maps a method name (ICUConfig.method, `--method`) to its Method; `OBJECTIVES` maps a
forget-loss name (ICUConfig.forget_loss) to the method that defines it.
"""

from __future__ import annotations

from .ascent import GA, GRADDIFF, ICU_GA, ICU_PAPER
from .base import ForgetBatch, Method, PrepareContext, UnseenNow
from .npo import NPO, SIMNPO
from .target import ICU
from .undial import UNDIAL

METHODS = {m.name: m for m in (ICU, ICU_GA, ICU_PAPER, GA, GRADDIFF, NPO, SIMNPO, UNDIAL)}
OBJECTIVES = {"target": ICU, "ga": ICU_GA, "npo": NPO, "simnpo": SIMNPO, "undial": UNDIAL}


def resolve(config) -> Method:
    """The method a config runs: its `method`, unless `forget_loss` was set to another method's term."""
    m = METHODS.get(config.method)
    if m is not None and m.preset.get("forget_loss") == config.forget_loss:
        return m
    return OBJECTIVES[config.forget_loss]


__all__ = ["METHODS", "OBJECTIVES", "resolve", "ForgetBatch", "Method", "PrepareContext", "UnseenNow"]
