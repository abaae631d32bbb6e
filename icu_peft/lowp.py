"""bf16 matmuls for the frozen weights of a training step on a CPU that has bf16 matrix instructions.

A forget request's step on a CPU is mostly matrix products with frozen weights: the dequantized 4-bit
base layers and the vocabulary-sized output head (SmolLM2: 9.3 s a step in fp32, 6.5 s of it in
`mm`/`bmm`). On a CPU with AVX512-BF16 or AMX, a bf16 product of those shapes runs about 2x faster
than fp32 (oneDNN accumulates in fp32 and rounds the result). `torch.autocast` would get that, but
it casts a frozen weight again at every call (only weights that require grad are cached), and the
head's 28M-element cast alone took 0.8 s of a step.

`FrozenBf16Matmuls` is a torch function mode for the training step only: `F.linear` with a weight
that does not require grad runs as bf16 x bf16 (the head's weight cast once per round), and its
result goes back to the input's dtype, so norms, softmaxes, attention, losses and the LoRA weights
stay in fp32. Scoring (the band, the stop rule, the report) never runs under it: what decides
"forgotten" is computed in the precision the user runs the model in.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

# Below this hidden size bf16 products gain little (one 2-core AVX512-BF16 CPU, 800 rows, casts included:
# 1.18x at 64 -> 128, 1.16x at 128 -> 512, 1.84x at 256 -> 1024, 2.12x at 512 -> 2048) and the trajectory
# changes: a fresh 2 x 256 Llama memoriser took 328 steps (308 s) with them against 164 (102 s) without,
# both 6/6 forgotten; SmolLM2 (576) kept its 56 steps. So auto starts at 512.
MIN_HIDDEN = 512


@functools.lru_cache(maxsize=1)
def cpu_has_bf16_matmul() -> bool:
    """The CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16; read from /proc/cpuinfo,
    so False where that file does not exist: there bf16 products may be emulated and slower)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_train_dtype(setting: str, device: torch.device, compute_dtype: torch.dtype,
                        hidden_size: Optional[int]) -> Optional[torch.dtype]:
    """The dtype of the frozen weights' products in training steps, or None for the compute dtype.

    `auto`: bfloat16 on a CPU with native bf16 matrix instructions, for a float32 model with a hidden
    size of at least MIN_HIDDEN; otherwise None (on a GPU the compute dtype is already bf16)."""
    if setting == "float32" or setting == str(compute_dtype).replace("torch.", ""):
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if setting != "auto":
        raise ValueError(f"train_dtype must be auto, float32 or bfloat16, not {setting!r}")
    if (device.type == "cpu" and compute_dtype == torch.float32 and cpu_has_bf16_matmul()
            and (hidden_size or 0) >= MIN_HIDDEN):
        return torch.bfloat16
    return None


class FrozenBf16Matmuls(TorchFunctionMode):
    """Inside: `F.linear(x, w, b)` with a frozen float32 `w` computes in `dtype` and returns x's dtype.

    Weights of at least `cache_min_numel` elements (the loop passes the output head's size) are cast
    once and cached by identity (and `w._version`, which counts in-place changes made through `w`
    itself, though not through `w.data`) until `clear`: the loop clears at every scoring round, where a
    precision view re-quantizes its weights. Smaller ones are cast at each call, as autocast does: on
    SmolLM2, caching every frozen weight the steps touch (the frozen prefix's, each precision view's)
    saved another 0.25 s of a 6.4 s step for 470 MB more peak memory; the head's cast alone was 0.8 s a
    step. Weights that require grad (the LoRA matrices) and non-float32 ones pass through."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16, cache_min_numel: int = 0):
        super().__init__()
        self.dtype, self.cache_min_numel = dtype, cache_min_numel
        self.cache: dict = {}

    def clear(self) -> None:
        self.cache.clear()

    def _low(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel() < self.cache_min_numel:
            return w.detach().to(self.dtype)
        hit = self.cache.get(id(w))
        # the entry holds `w` itself, so its id cannot be reused by another tensor while cached
        if hit is not None and hit[0] is w and hit[1] == w._version:
            return hit[2]
        low = w.detach().to(self.dtype)
        self.cache[id(w)] = (w, w._version, low)
        return low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and not w.requires_grad and w.dtype == torch.float32
                    and x.dtype == torch.float32):
                if b is not None:
                    b = b.to(self.dtype) if b.requires_grad or b.dtype != torch.float32 else self._low(b)
                # the mode is off inside its own handler: this call is the plain F.linear
                return func(x.to(self.dtype), self._low(w), b).to(x.dtype)
        return func(*args, **kwargs)


def checkpoint_contexts():
    """`context_fn` for torch.utils.checkpoint: activation checkpointing recomputes a block in backward,
    where torch function modes are not active, so the recomputed tensors would be float32 where the
    forward saved bf16 ones (a CheckpointError). This re-enters the forward's FrozenBf16Matmuls, if
    any, around the recomputation."""
    modes = [m for m in _get_current_function_mode_stack() if isinstance(m, FrozenBf16Matmuls)]
    return nullcontext(), (modes[-1] if modes else nullcontext())
