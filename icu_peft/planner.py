"""How much memory a forget request needs, predicted from the model's config alone (no weights).

`plan_memory(model_config, config, ...)` adds up what a request holds at its peak:

- **base**: the frozen base as loaded: NF4 with double quantization for every linear layer but the
  output head (what a 4-bit load quantizes; 0.5 byte + block statistics per weight), the rest in the
  compute dtype. Full fine-tuning keeps every weight in the compute dtype.
- **precision_view**: with a 4-bit base and `precision_check`, a second full-precision copy of the
  base plus the NF4 packing of its merged linears (precision.py). `auto` builds it only when it fits
  in 60% of the free memory: pass the device's memory to decide the same way.
- **dense_weights** (CPU, 4-bit): the dequantized copies `dequant_cache_mb` keeps (dequant.py), the
  base's linears and then the merged view's, within the setting ('auto': a quarter of what is left of
  `device_memory`, when given).
- **train_dtype_copies** (where `train_dtype` resolves to bf16: a CPU with bf16 matrix instructions):
  the bf16 copy of the output head the steps keep (lowp.py), once per precision they run through.
- **trainable**: LoRA weights with their gradient and Adam's two moments (fp32: 16 bytes each); for
  full fine-tuning every weight's gradient and moments, plus the frozen reference copy of the base.
- **caches**: the reference hidden states (`reference_cache_mb`) and, with `lora_layers`, the
  frozen-prefix hidden states (`prefix_cache_mb`), each as large as the samples make it, up to its cap.
- **step**: the activations autograd keeps for one training pass (forget batch, or a neighbour micro
  batch, whichever is larger) through every layer the gradient crosses, one layer's backward
  temporaries, the largest dequantized weight, one chunk of logits in the loss, and under bf16 products
  (`train_dtype`, lowp.py) the bf16 cast of every frozen weight in those layers, which autograd keeps
  for the backward pass (one layer's with gradient checkpointing).
- **heap_steps** (CPU, `cpu_heap_steps`): the freed blocks the heap keeps during a step when the steps
  take their blocks from it (allocator.HeapSteps): one more step's worth. 'auto' takes the heap when the
  memory left beside the static parts holds three steps (without `device_memory`: counted), and never
  in a one-step budget (its one step is the measured one).
- **scoring**: one scoring batch's chunk of logits (log-softmax and its gather), no autograd.
- **load** (CPU, 4-bit, when the weight files' size is known): the checkpoint's mapped pages while
  bitsandbytes packs them, beside the packed base.

peak = base + precision_view + dense_weights + train_dtype_copies + trainable + caches + runtime +
max(step + heap_steps, scoring), or load if larger.

The step's activations are not guessed: `activation_probe` builds one decoder layer of the model's
real shape (uninitialised memory, tiny vocabulary), runs it forward with autograd at two lengths and
counts the bytes of every tensor autograd saves (parameters excluded, shared storage once). Bytes per
token = a + b x length covers attention kernels that keep L^2 scores as well as those that do not.

Runtime: the libraries themselves (CPU: this process's resident memory after importing torch and
transformers; CUDA: the context is outside `torch.cuda.max_memory_allocated`, so 0).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional

import torch

from .calibrate import StepBudget
from .dequant import AUTO_SHARE
from .allocator import HEAP_AUTO_MARGIN

# bitsandbytes' 4-bit storage (QLoRA settings): 4 bits per weight, one 8-bit absmax per block of 64,
# and with double quantization one fp32 scale per 256 of those absmax values.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
ADAM_BYTES_PER_TRAINABLE = 4 * 4  # fp32 weight, gradient, two moments
LOGIT_COPIES = 3  # logits, log-softmax, the gathered / scattered copy or its gradient


@dataclass
class LayerActivations:
    """Bytes autograd keeps per token for one decoder layer: a + b x sequence length."""

    per_token: float
    per_token_per_length: float

    def bytes(self, tokens: int, length: int) -> float:
        return tokens * (self.per_token + self.per_token_per_length * length)


@dataclass
class MemoryPlan:
    """A predicted peak, by part (bytes), and what it was predicted for."""

    parts: Dict[str, float]
    peak_bytes: float
    setting: Dict[str, object] = field(default_factory=dict)
    fits: Optional[bool] = None

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        gib = 2**30
        lines = [f"{k:>16}: {v / gib:8.2f} GiB" for k, v in self.parts.items()]
        lines.append(f"{'peak':>16}: {self.peak_bytes / gib:8.2f} GiB")
        if self.fits is not None:
            lines.append(f"{'fits':>16}: {'yes' if self.fits else 'no'}")
        return "\n".join(lines)


def meta_model(model_config):
    """The model built on the meta device: shapes and module types, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config)
    model.tie_weights()  # a meta build leaves tied embeddings as two tensors; a real load shares one
    return model


def _linears(model):
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head:
            yield name, m


def _numel(m) -> int:
    return m.weight.numel()


def _in_out(m):
    from transformers.pytorch_utils import Conv1D

    w = m.weight
    return (w.shape[0], w.shape[1]) if isinstance(m, Conv1D) else (w.shape[1], w.shape[0])


def _layer_index(name: str) -> Optional[int]:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a in ("layers", "h", "layer", "blocks") and b.isdigit():
            return int(b)
    return None


def _lora_targets(model, target_modules, layers: Optional[set]) -> list:
    """The linear layers LoRA goes into: 'all-linear' is every linear but the output head (PEFT)."""
    out = []
    for name, m in _linears(model):
        if target_modules != "all-linear" and name.rsplit(".", 1)[-1] not in set(target_modules):
            continue
        if layers is not None and _layer_index(name) not in layers:
            continue
        out.append(m)
    return out


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _probe_config(model_config, vocab: int = 128):
    cfg = model_config.__class__.from_dict(model_config.to_dict())
    cfg.num_hidden_layers = 1
    cfg.vocab_size = vocab
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:1]
    for attr in ("n_layer", "num_layers"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, 1)
    return cfg


def activation_probe(model_config, dtype: torch.dtype = torch.float32, lora_r: int = 8,
                     target_modules="all-linear", use_lora: bool = True, lengths=(32, 64)) -> LayerActivations:
    """Measure what autograd saves per token in one decoder layer of this shape (see module docstring)."""
    from transformers import AutoModelForCausalLM

    cfg = _probe_config(model_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # uninitialised memory may hold NaNs; the values do not matter
            p.normal_(0, 0.02)
    if use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=target_modules))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    layer = _decoder_layers(model)[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counting = [False]
    seen: dict = {}

    def pack(t):
        if counting[0] and t.device.type != "meta":
            key = t.untyped_storage().data_ptr()
            if key not in params:
                seen[key] = t.untyped_storage().nbytes()
        return t

    h1 = layer.register_forward_pre_hook(lambda *a: counting.__setitem__(0, True))
    h2 = layer.register_forward_hook(lambda *a: counting.__setitem__(0, False))
    measured = []
    try:
        for length in lengths:
            seen.clear()
            ids = torch.randint(0, cfg.vocab_size, (1, length))
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model(inputs_embeds=embeds, use_cache=False)
            measured.append(sum(seen.values()) / length)
    finally:
        h1.remove()
        h2.remove()
    (l1, l2), (m1, m2) = lengths, measured
    slope = max((m2 - m1) / (l2 - l1), 0.0)
    return LayerActivations(per_token=max(m1 - slope * l1, 0.0), per_token_per_length=slope)


def _decoder_layers(model) -> list:
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) and _layer_index_of(model, m) is not None:
            return list(m)
    raise ValueError("no decoder layer list found in this model")


def _layer_index_of(model, ml) -> Optional[str]:
    for name, m in model.named_modules():
        if m is ml and name.rsplit(".", 1)[-1] in ("layers", "h", "layer", "blocks"):
            return name
    return None


def runtime_bytes(device_type: str) -> float:
    """The libraries' own memory: this process's resident set on CPU once it has imported what a forget
    request imports; 0 on CUDA (the context is not in torch's allocation count)."""
    if device_type != "cpu":
        return 0.0
    try:
        import importlib

        import psutil

        for name in ("transformers", "peft", "accelerate", "bitsandbytes", "icu_peft.unlearner"):
            try:
                importlib.import_module(name)
            except ImportError:
                pass

        return float(psutil.Process().memory_info().rss)
    except Exception:
        return 0.0


def plan_memory(model_config, config, device_type: str = "cpu", seq_len: Optional[int] = None,
                forget_samples: int = 8, retain_samples: int = 32, device_memory: Optional[float] = None,
                runtime: Optional[float] = None, probe: Optional[LayerActivations] = None,
                checkpoint_bytes: Optional[float] = None) -> MemoryPlan:
    """Predict the peak memory of one forget request (bytes); `config` is an ICUConfig.

    seq_len: tokens per sample (default config.max_length, the worst case). device_memory: bytes
    available to the request; with it, `fits` is answered and precision_check 'auto' decided as
    the loop decides it. checkpoint_bytes: size of the weight files (see `checkpoint_size`); a 4-bit load
    on CPU holds them mapped while it quantizes, which can be the peak when no full-precision view is built.
    """
    from .models import hidden_size, resolve_compute_dtype

    dtype = resolve_compute_dtype(config.compute_dtype, torch.device("cuda" if device_type == "cuda" else "cpu"))
    if device_type == "cuda" and config.compute_dtype == "auto":
        dtype = torch.bfloat16  # what 'auto' gives on any recent GPU, whether or not one is here
    db = _dtype_bytes(dtype)
    length = int(seq_len or config.max_length)
    model = meta_model(model_config)
    n_layers = len(_decoder_layers(model))
    hidden = hidden_size(model_config)
    vocab = int(model_config.vocab_size)
    all_params = sum(p.numel() for p in model.parameters())
    linear_params = sum(_numel(m) for _, m in _linears(model))
    largest_linear = max(_numel(m) for _, m in _linears(model))
    quantize = config.quantize and config.use_lora

    parts: Dict[str, float] = {}
    if quantize:
        parts["base"] = linear_params * NF4_BYTES_PER_WEIGHT + (all_params - linear_params) * db
    else:
        parts["base"] = all_params * db

    view = 0.0
    if quantize and config.precision_check != "off":
        full = all_params * db
        if config.precision_check == "on" or device_memory is None or full <= 0.6 * (device_memory - parts["base"]):
            view = full + linear_params * NF4_BYTES_PER_WEIGHT
    parts["precision_view"] = view

    # dequant.py: dense copies of the 4-bit weights on the CPU (the base's first, then the merged view's)
    dense = 0.0
    if quantize and device_type == "cpu":
        wanted = linear_params * db * (2 if view else 1)
        if config.dequant_cache_mb == "auto":
            room = None if device_memory is None else AUTO_SHARE * max(0.0, device_memory - parts["base"] - view)
            dense = wanted if room is None else min(wanted, room)
        else:
            dense = min(wanted, float(config.dequant_cache_mb) * 2**20)
    parts["dense_weights"] = dense

    # lowp.py: where train_dtype resolves to bf16, the steps keep a bf16 copy of the output head (of the
    # trained model and of each precision view; smaller weights are cast per call)
    from .lowp import resolve_train_dtype

    low = resolve_train_dtype(config.train_dtype, torch.device("cuda" if device_type == "cuda" else "cpu"), dtype, hidden)
    parts["train_dtype_copies"] = (vocab * hidden * _dtype_bytes(low) * (1 + (2 if view else 0))
                                   if low is not None else 0.0)

    first = n_layers - config.lora_layers if config.use_lora and config.lora_layers else 0
    if config.use_lora:
        targets = _lora_targets(model, config.target_modules, set(range(first, n_layers)) if first else None)
        lora = sum(config.lora_r * sum(_in_out(m)) for m in targets)
        parts["trainable"] = lora * ADAM_BYTES_PER_TRAINABLE
    else:
        # every weight: fp32-sized gradient and moments, plus the frozen reference copy of the base
        parts["trainable"] = all_params * (db + 8) + all_params * db

    act_bytes = 4 if dtype == torch.float32 else db
    state = hidden * 4  # cached hidden states are kept as the model computes them; fp32 bound
    # with kl_anchor each kept sample also holds r = W^T p_ref (one hidden-size vector a position) and lse_ref,
    # within the same budget
    ref_cache = min(config.reference_cache_mb * 2**20,
                    retain_samples * length * (2 * state + 4 if config.kl_anchor else state))
    prefix_cache = (min(config.prefix_cache_mb * 2**20, (forget_samples + retain_samples) * length * state)
                    if first else 0.0)
    parts["caches"] = ref_cache + prefix_cache * (1 + (2 if view else 0))

    probe = probe or activation_probe(model_config, dtype=dtype, lora_r=config.lora_r,
                                      target_modules=config.target_modules, use_lora=config.use_lora)
    neighbours = forget_samples and min(config.batch_size, forget_samples) * config.num_neighbours + config.retain_kl_samples
    micro = config.neighbour_micro_batch
    # the never-seen anchor (unseen_kl_samples) runs as a pass of its own
    pass_rows = max(min(config.batch_size, forget_samples), micro if micro and neighbours > micro else neighbours,
                    config.unseen_kl_samples)
    tokens = pass_rows * length
    grad_layers = n_layers - first
    per_layer = probe.bytes(tokens, length)
    if config.gradient_checkpointing:
        kept = grad_layers * tokens * hidden * act_bytes + per_layer
    else:
        kept = grad_layers * per_layer
    dequant = largest_linear * act_bytes if quantize else 0.0
    # lowp.py: under bf16 products a frozen weight is cast at each call, and autograd keeps the cast for the
    # backward pass of every layer the gradient crosses (one layer's at a time with checkpointing): on the
    # 1.7B shape the step took 3.8 GB over the static memory, where the plan's step (one weight counted) was 1.2 GB
    saved_casts = 0.0
    if low is not None:
        grad_linears = sum(_numel(m) for name, m in _linears(model)
                           if (i := _layer_index(name)) is not None and i >= first)
        saved_casts = grad_linears * _dtype_bytes(low) / (grad_layers if config.gradient_checkpointing else 1)
    # the entropy targets (entropy_weight) hold two more vocabulary-sized tensors: p and p log p
    copies = LOGIT_COPIES + (2 if config.entropy_weight and config.forget_loss == "target" else 0)
    logits_chunk = pass_rows * min(config.loss_chunk_size, length) * vocab * 4 * copies
    parts["step"] = kept + per_layer + dequant + saved_casts + logits_chunk
    score_rows = min(config.score_batch_size, max(forget_samples, retain_samples))
    parts["scoring"] = score_rows * min(64, length) * vocab * 4 * LOGIT_COPIES + dequant
    parts["runtime"] = runtime_bytes(device_type) if runtime is None else runtime

    static = (parts["base"] + parts["precision_view"] + parts["dense_weights"] + parts["train_dtype_copies"]
              + parts["trainable"] + parts["caches"] + parts["runtime"])
    # cpu_heap_steps (allocator.HeapSteps): the heap keeps about one step's freed blocks at the step's peak
    # (SmolLM2-135M, 4-bit, one view: +592 MB measured, the step counted here 626 MB); 'auto' takes the heap
    # when the memory left after the static part holds HEAP_AUTO_MARGIN steps (without a device size: counted)
    # (and only after its first, measured step: a one-step budget never takes it)
    heap = device_type == "cpu" and (config.cpu_heap_steps is True or config.cpu_heap_steps == "auto" and (
        config.step_budget(forget_samples) > 1
        and (device_memory is None or device_memory - static >= HEAP_AUTO_MARGIN * parts["step"])))
    parts["heap_steps"] = parts["step"] if heap else 0.0
    # a step's activations are freed before scoring runs (on CPU with glibc's mmap threshold fixed, as the
    # CLI does: allocator.py; without it the heap keeps them and the two add up)
    peak = static + max(parts["step"] + parts["heap_steps"], parts["scoring"])
    if checkpoint_bytes and quantize and device_type == "cpu":
        # a 4-bit load reads the checkpoint through a memory map: its pages are resident while it is packed
        parts["load"] = parts["runtime"] + checkpoint_bytes + parts["base"]
        peak = max(peak, parts["load"])
    setting = {"model_type": getattr(model_config, "model_type", None), "parameters": all_params,
               "layers": n_layers, "dtype": str(dtype).replace("torch.", ""), "quantize": quantize,
               "use_lora": config.use_lora, "lora_r": config.lora_r, "lora_layers": config.lora_layers,
               "seq_len": length, "batch_size": config.batch_size, "forget_samples": forget_samples,
               "retain_samples": retain_samples, "precision_view": bool(view),
               "gradient_checkpointing": config.gradient_checkpointing, "device": device_type,
               "step_budget": config.step_budget(forget_samples),
               # max_steps auto grows while a request still closes in at its end, up to StepBudget's cap
               "step_budget_max": StepBudget(config.step_budget(forget_samples), auto=config.max_steps == "auto",
                                             max_factor=config.budget_growth).cap,
               # forget batch, neighbours and retain samples, never-seen anchor, forget batch again per view
               "tokens_per_step": (min(config.batch_size, forget_samples) * (2 if view else 1) + neighbours
                                   + config.unseen_kl_samples) * length,
               "activation_bytes_per_token_per_layer": round(probe.per_token + probe.per_token_per_length * length)}
    fits = None if device_memory is None else peak <= device_memory
    return MemoryPlan(parts=parts, peak_bytes=peak, setting=setting, fits=fits)


def checkpoint_size(source: str) -> Optional[float]:
    """Bytes of a local model directory's weight files (stat only; None for anything else)."""
    from pathlib import Path

    d = Path(source).expanduser()
    if not d.is_dir():
        return None
    files = list(d.glob("*.safetensors")) or list(d.glob("*.bin"))
    return float(sum(f.stat().st_size for f in files)) or None


def load_model_config(source: str, trust_remote_code: bool = False):
    """A transformers config from a model directory, a config.json file or a hub id already cached."""
    from pathlib import Path

    from transformers import AutoConfig

    from .errors import ModelLoadError

    p = Path(source).expanduser()
    try:
        if p.is_file():
            import json

            data = json.loads(p.read_text())
            return AutoConfig.for_model(data.pop("model_type"), **data)
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types for "not a config"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot read a model config from '{source}': {first}") from None


def predicted_seconds(plan: MemoryPlan, tokens_per_second: float, steps: Optional[int] = None) -> float:
    """Training time of a request at a measured throughput (tokens through the model per second, forward
    and backward): `steps` optimizer steps (default: the plan's step budget) of `tokens_per_step` each."""
    if not (tokens_per_second > 0 and math.isfinite(tokens_per_second)):
        raise ValueError("tokens_per_second must be a positive number")
    steps = plan.setting["step_budget"] if steps is None else steps
    return steps * plan.setting["tokens_per_step"] / tokens_per_second
