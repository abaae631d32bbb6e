"""The full-precision view: a forget adapter trained on a 4-bit base must forget on the full one too.

The adapter is trained against the NF4 weights Q(W). Merged, it runs on W; NF4 rounding of W moves
a memorised sample's loss by about as much as the calibrated adapter moves it, so an adapter that
lands a sample mid-band on Q(W) left it familiar on W (measured: SmolLM2 quick demo 2/2 forgotten
on the 4-bit base, 0/2 merged in fp32; docs/BENCHMARKS.md). The view holds a second copy of the
base in full precision with a LoRA adapter whose weights *are* the training adapter's (the same
Parameter objects): every step the forget term is also taken through it, and every scoring round
scores the forget set through it, so a sample counts as forgotten only when it is inside the band
in both precisions.

The copy costs the base's full-precision memory; `precision_check="auto"` builds it only when the
base is 4-bit and the copy fits in the free memory of the device, and the manifest records which
precisions were checked.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger("icu_peft")

# the copy may take this share of the memory free when it is loaded: the rest is for activations
FREE_SHARE = 0.6


class MergedQuantized:
    """The full-precision view's model as a merged-then-quantized copy would compute: every linear layer
    that a 4-bit load quantizes runs on NF4(W + s*B@A) instead (the quantize attack's NF4 row).

    Each layer's forward is wrapped (`_MergedForward`): while `on`, the value is the quantized layer's,
    the gradient the full-precision one's (straight-through: rounding has no useful gradient), so the
    forget term can train through it. The packed weights are re-quantized from the current adapter by
    `refresh` (every scoring round): 4 bits per weight, dequantized per forward unless `densify` keeps
    them dequantized.
    """

    def __init__(self, model):
        from peft.tuners.lora import LoraLayer

        head = model.get_output_embeddings()
        self.lora, self.plain = [], []
        inside = set()
        for m in model.modules():
            if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), _LINEAR):
                self.lora.append(m)
                inside.update(id(x) for x in m.modules())
        for m in model.modules():
            if isinstance(m, _LINEAR) and id(m) not in inside and m is not head:
                self.plain.append(m)
        self.packed: dict = {}
        self.snapshot: dict = {}  # per LoRA layer: [(adapter, A, B)] as they were at the last refresh
        self.dense: set = set()  # layers whose merged weight is kept dequantized (densify)
        self.on = False
        for m in self.lora + self.plain:
            m.forward = _MergedForward(self, m)
        with torch.no_grad():
            for m in self.plain:  # no adapter: quantized once
                self.packed[m] = self._store(m, _quantize(_out_in(m, m.weight)))
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        for m in self.lora:
            w = m.base_layer.weight
            # PEFT's delta is laid out like the base weight (transposed for Conv1D: fan_in_fan_out)
            delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
            self.packed[m] = self._store(m, _quantize(_out_in(m.base_layer, w + delta.to(w.dtype))))
            # flagged as requiring grad (used under no_grad only, in no optimizer) so that lowp's bf16 mode
            # treats them as it treats the live LoRA weights: both products in one precision, so the
            # drift right after a refresh is exactly zero. The live weights' version counters say whether
            # anything wrote to them since (an optimizer step, a restore).
            self.snapshot[m] = [(a, m.lora_A[a].weight.detach().clone().requires_grad_(True),
                                 m.lora_B[a].weight.detach().clone().requires_grad_(True),
                                 (m.lora_A[a].weight._version, m.lora_B[a].weight._version))
                                for a in m.active_adapters if a in m.lora_A]

    def drift(self, module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """What the adapter added to `module`'s output since the last refresh: s * (B A - B0 A0) x, low rank.

        Between two refreshes the packed weights hold NF4(W + delta) of the adapter *as it was*; a
        training step's value through them alone ignored every step since, so the merged view's forget
        term pushed for a whole round on stale numbers, overshot, and pulled back the next round (the
        set's mean NLL swung by up to 0.5 nats round to round on a GPT-2 memoriser). With the drift added
        the value follows the adapter; only NF4's rounding error stays as it was at the refresh.
        None while nothing has written to the adapter since the refresh (every scoring pass, EL_n's
        roll-outs included, runs right after one: the drift would be exactly zero)."""
        snap = self.snapshot.get(module)
        if not snap or all((module.lora_A[a].weight._version, module.lora_B[a].weight._version) == v
                           for a, _, _, v in snap):
            return None
        out = None
        with torch.no_grad():
            for a, a0, b0, _ in snap:
                s = module.scaling[a]
                now = module.lora_B[a](module.lora_A[a](x.to(module.lora_A[a].weight.dtype)))
                then = torch.nn.functional.linear(torch.nn.functional.linear(x.to(a0.dtype), a0), b0)
                d = (now - then) * s
                out = d if out is None else out + d
        return out

    def densify(self, budget: int) -> int:
        """Keep up to `budget` bytes of the packed weights dequantized (top layers first), so the forward
        passes between two refreshes do not each dequantize them again (dequant.py says why that
        matters on the CPU). Returns the bytes used."""
        used = 0
        for m in reversed(self.lora + self.plain):
            packed = self.packed[m]
            if isinstance(packed, torch.Tensor):
                continue
            state = packed[1]
            size = int(state.shape.numel()) * torch.finfo(state.dtype).bits // 8
            if used + size > budget:
                break
            self.dense.add(m)
            used += size
        with torch.no_grad():
            for m in self.dense:
                self.packed[m] = self._store(m, self.packed[m])
        return used

    def _store(self, module, packed):
        """`packed` as kept for `module`: dequantized (in the view's dtype) when the module is in `dense`."""
        if module not in self.dense or isinstance(packed, torch.Tensor):
            return packed
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(*packed)

    def quantized(self, module, x: torch.Tensor) -> torch.Tensor:
        """`module`'s output as its merged NF4 copy computes it, without autograd: with it, autograd would
        keep every layer's dequantized weight for the backward pass (a second full-precision copy of the
        model per training pass through this view); the gradient is the full-precision layer's anyway."""
        import bitsandbytes.functional as bnbf

        packed = self.packed[module]
        with torch.no_grad():
            w = (packed if isinstance(packed, torch.Tensor) else bnbf.dequantize_4bit(*packed)).to(x.dtype)
            bias = getattr(getattr(module, "base_layer", module), "bias", None)
            return torch.nn.functional.linear(x, w, bias)


class _MergedForward:
    """A layer's forward while the merged NF4 view is on: the quantized value, with the full-precision
    layer's gradient (straight-through) when autograd records; without autograd (scoring, roll-outs)
    the full-precision pass is skipped, since only its gradient was used."""

    def __init__(self, owner: MergedQuantized, module):
        self.owner, self.module, self.own = owner, module, module.forward

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if not self.owner.on:
            return self.own(x, *args, **kwargs)
        y = self.owner.quantized(self.module, x)
        drift = self.owner.drift(self.module, x)
        if drift is not None:
            y = y + drift.to(y.dtype)
        if not torch.is_grad_enabled():
            return y
        out = self.own(x, *args, **kwargs)
        return out + (y - out.detach())


# nn.Linear and transformers' Conv1D (GPT-2 and its kin: y = x @ W + b, W stored (in, out)): the layers a
# 4-bit load quantizes. Conv1D was missed at first: on a GPT-2 the merged view then ran the plain base
# without the adapter, and no request could ever finish.
_LINEAR = (torch.nn.Linear, Conv1D)


def _out_in(layer, w: torch.Tensor) -> torch.Tensor:
    """`w` in nn.Linear's (out, in) layout, which is how a 4-bit load stores (and blocks) it."""
    return w if isinstance(layer, torch.nn.Linear) else w.t()


def _quantize(w: torch.Tensor):
    """NF4 with double quantization in blocks of 64: what a 4-bit load (QLoRA settings) stores."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(w.detach().contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")


@dataclass
class PrecisionView:
    """The full-precision base with the training adapter's own LoRA weights attached, and the same
    model computing as its merged NF4 copy would (`merged`, switched on by `as_view(1)`)."""

    model: object  # PeftModel over the full-precision base
    name: str  # its precision, as the manifest names it ("float32", "bfloat16", ...)
    merged: Optional[MergedQuantized] = None

    def names(self) -> list:
        return [self.name] + (["nf4_merged"] if self.merged is not None else [])

    @contextmanager
    def as_view(self, k: int):
        """Run the model as view k of names(): 0 the full-precision base, 1 the merged NF4 copy."""
        if k == 0 or self.merged is None:
            yield self.model
            return
        self.merged.on = True
        try:
            yield self.model
        finally:
            self.merged.on = False


def parameter_count(model) -> int:
    """Weights of a model as loaded, counting a packed 4-bit tensor by the weights it stands for."""
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        total += int(qs.shape.numel()) if qs is not None and getattr(qs, "shape", None) is not None else p.numel()
    return total


def free_memory_bytes(device: torch.device) -> int:
    """Memory free for a new model copy on `device` (CUDA: the driver's count; CPU: the OS's available)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil  # a dependency of accelerate

    return int(psutil.virtual_memory().available)


def view_bytes(config, base_model, device: torch.device) -> int:
    """Memory of the full-precision copy of `base_model` the view loads."""
    from .models import resolve_compute_dtype

    return parameter_count(base_model) * torch.finfo(resolve_compute_dtype(config.compute_dtype, device)).bits // 8


def wanted(config, base_model, device: torch.device) -> Optional[str]:
    """None when the view should be built, else the reason it is not (logged, and kept in the manifest)."""
    setting = config.precision_check
    if setting == "off":
        return "off (precision_check)"
    if not getattr(base_model, "is_loaded_in_4bit", False):
        return "not needed: the base is not quantized"
    if hasattr(base_model, "peft_config"):
        return "not built for sequential stacking (--on-top-of)"
    if not config.use_lora:
        return "not needed: full fine-tuning"
    if not config.model:
        return "no model path to load the full-precision base from"
    if setting == "auto":
        need = view_bytes(config, base_model, device)
        free = free_memory_bytes(device)
        if need > FREE_SHARE * free:
            return (f"the full-precision base ({need / 2**30:.1f} GiB) does not fit beside the 4-bit one "
                    f"({free / 2**30:.1f} GiB free); use precision_check='on' to force it")
    return None


def tie_lora(src, dst) -> int:
    """Make every trainable parameter of `src` (a PeftModel) the same object in `dst` (same names)."""
    params = {n: p for n, p in src.named_parameters() if p.requires_grad}
    tied = 0
    for name, _ in list(dst.named_parameters()):
        if name in params:
            owner, _, attr = name.rpartition(".")
            setattr(dst.get_submodule(owner), attr, params[name])
            tied += 1
    if tied != len(params):
        raise RuntimeError(f"full-precision view: tied {tied} of {len(params)} adapter weights (layouts differ)")
    return tied


def build_view(config, trained_model, device: torch.device) -> PrecisionView:
    """Load the base in full precision and attach the training adapter's weights to it."""
    from .models import attach_lora, load_base_model, resolve_compute_dtype

    base = load_base_model(config.model, quantize=False, compute_dtype=config.compute_dtype,
                           gguf_file=config.gguf_file, trust_remote_code=config.trust_remote_code, device=device)
    view = attach_lora(base, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules,
                       config.gradient_checkpointing, last_layers=config.lora_layers)
    tie_lora(trained_model, view)
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    return PrecisionView(model=view, name=str(dtype).replace("torch.", ""), merged=MergedQuantized(view))


__all__ = ["PrecisionView", "MergedQuantized", "parameter_count", "free_memory_bytes", "view_bytes", "wanted", "tie_lora",
           "build_view"]
