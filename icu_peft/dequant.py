"""Dense copies of a 4-bit base's frozen weights, for runs on the CPU.

bitsandbytes has no fused 4-bit kernel on the CPU: every forward (and backward) of an NF4 layer
dequantizes its whole weight and then runs a dense matmul. The base is frozen for a whole forget
request, so that work is the same every time. In the EL_n roll-outs (one token at a time, with the KV
cache) it was most of the cost: profiling the quick demo on 2 cores, bitsandbytes' dequantization took
more than half of the roll-outs' time and about a third of the request's.

`DenseWeights` dequantizes each 4-bit layer once, keeps the result, and runs the layer as a dense
linear over it: the same numbers bitsandbytes computes (its CPU path is dequantize-then-linear), for
the memory of the dense weights. Layers are taken from the top of the model down (the layers with
LoRA run in every training step; the frozen-prefix cache already spares the lower ones) until the
budget is spent. On CUDA bitsandbytes' kernels read the packed weights directly, so `auto` keeps no
copy there.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Optional

import torch

from .offline import import_bitsandbytes

logger = logging.getLogger("icu_peft")

# `auto` budget on the CPU: this share of the memory available when the copies are made (the rest is
# for activations, caches and the precision view, which is decided before)
AUTO_SHARE = 0.25


def four_bit_layers(model) -> list:
    """bitsandbytes Linear4bit modules of `model`, in module order (bottom of the network first)."""
    try:
        bnb = import_bitsandbytes()
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def dense_bytes(layer) -> int:
    """Bytes of `layer`'s dequantized weight in its compute dtype."""
    qs = layer.weight.quant_state
    dtype = layer.compute_dtype or qs.dtype
    return int(qs.shape.numel()) * torch.finfo(dtype).bits // 8


def budget_bytes(setting, device: torch.device, reserve: int = 0) -> int:
    """The `dequant_cache_mb` setting in bytes: `auto` = AUTO_SHARE of the memory available on the CPU
    once `reserve` bytes are set aside (the precision view's copy, loaded later), nothing on an
    accelerator (its 4-bit kernels need no copy)."""
    if setting == "auto":
        if device.type != "cpu":
            return 0
        from .precision import free_memory_bytes

        return int(AUTO_SHARE * max(0, free_memory_bytes(device) - reserve))
    return int(float(setting) * 2**20)


class DenseWeights:
    """Keep dequantized copies of 4-bit layers' weights and run those layers as dense linears.

    `attach` patches the layers' `forward` (an instance attribute, so PEFT's LoRA wrappers, which call
    their base layer, use it too); `detach` restores bitsandbytes' own. Only valid while the packed
    weights do not change, which is the case for the frozen base of a forget request.
    """

    def __init__(self) -> None:
        self.layers: list = []
        self.bytes = 0
        self.budget = 0

    def attach(self, model, budget: int) -> "DenseWeights":
        self.budget = budget
        for layer in reversed(four_bit_layers(model)):  # top first: see the module docstring
            if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
                continue  # repacked by bitsandbytes for its own CPU kernel: leave it to it
            if isinstance(layer.__dict__.get("forward"), _DenseForward):
                continue  # made dense by an outer caller (the demo around forget()): theirs to detach
            size = dense_bytes(layer)
            if self.bytes + size > budget:
                break
            self._patch(layer)
            self.bytes += size
        if self.layers:
            logger.info("dense 4-bit weights: %d of %d layers dequantized once (%.0f MB) instead of every forward",
                        len(self.layers), len(four_bit_layers(model)), self.bytes / 2**20)
        return self

    def _patch(self, layer) -> None:
        import bitsandbytes.functional as bnbf

        with torch.no_grad():
            dtype = layer.compute_dtype or layer.weight.quant_state.dtype
            weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        layer.forward = _DenseForward(layer, weight)
        self.layers.append(layer)

    def detach(self) -> None:
        for layer in self.layers:
            if isinstance(layer.__dict__.get("forward"), _DenseForward):
                del layer.forward
        self.layers, self.bytes = [], 0


class _DenseForward:
    """Linear4bit.forward over a dequantized weight: input cast to the compute dtype, output back to
    the input's dtype, as bitsandbytes does."""

    def __init__(self, layer, weight: torch.Tensor):
        self.layer, self.weight = layer, weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if self.weight.dtype != dtype:
            x = x.to(self.weight.dtype)
        bias = self.layer.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight, bias).to(dtype)


def attach_dense_weights(model, setting, device: torch.device, reserve: int = 0) -> Optional[DenseWeights]:
    """Dense copies of `model`'s 4-bit layers within the `dequant_cache_mb` setting (None when the
    model has no 4-bit layer or the budget is 0)."""
    budget = budget_bytes(setting, device, reserve)
    if budget <= 0 or not four_bit_layers(model):
        return None
    return DenseWeights().attach(model, budget)


@contextmanager
def dense_weights(model, setting, device: torch.device, reserve: int = 0):
    """attach_dense_weights for the duration of a block (yields the DenseWeights, or None)."""
    dense = attach_dense_weights(model, setting, device, reserve)
    try:
        yield dense
    finally:
        if dense is not None:
            dense.detach()


__all__ = ["DenseWeights", "attach_dense_weights", "dense_weights", "budget_bytes", "dense_bytes", "four_bit_layers"]
