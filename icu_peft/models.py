"""Loading a base model (4-bit NF4 or full precision), attaching LoRA, fingerprinting the base."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch

from .atomicfile import atomic_write
from .errors import InputError, ModelLoadError
from .lowp import checkpoint_contexts
from .offline import import_bitsandbytes

logger = logging.getLogger(__name__)


def resolve_compute_dtype(name: str, device: Optional[torch.device] = None) -> torch.dtype:
    """'auto' is bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16 matmuls are slow)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    """The device accelerate would pick for this process (its local GPU under DDP)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available()).device


def load_tokenizer(model_name: str, gguf_file: Optional[str] = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_exists(model_name)
    _refuse_adapter(model_name)
    kw = {"trust_remote_code": trust_remote_code}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(model_name, **kw)
    except Exception as e:  # transformers raises many types for "not a model"
        raise ModelLoadError(f"cannot load a tokenizer from '{model_name}': {_first_line(e)}") from None
    if tok.pad_token_id is None:
        # Padding is always masked out, so any id will do; EOS is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def _check_exists(model_name: Optional[str]) -> None:
    """A path-looking name that does not exist is a typo, not a hub id: say so before transformers does."""
    if model_name is None:
        raise ModelLoadError("no base model given (--model)")
    # hub ids are "name" or "org/name" of letters, digits and -_. ; anything else is meant as a local path,
    # and so is "dir/name" when "dir" is a local directory (a typo in the last part, not a hub id)
    import re

    first = model_name.split("/", 1)[0]
    looks_local = (model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
                   or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?", model_name)
                   or ("/" in model_name and Path(first).is_dir()))
    if not Path(model_name).expanduser().exists() and (looks_local or os.environ.get("HF_HUB_OFFLINE") == "1"):
        raise ModelLoadError(f"model not found: {model_name}")


def _check_merged_model(model_name: str) -> None:
    """A directory with a forget manifest (an icu-peft merged model) is loaded only if its files check out.

    Every command that takes --model comes through here, so a tampered merged model is refused by
    verify, eval and generate alike, not only by inspect. A forget adapter passed as --model is refused.
    """
    from .adapters import verify_files

    m = _refuse_adapter(model_name)
    if m is not None:
        verify_files(model_name, m)


def _refuse_adapter(model_name: str) -> Optional[dict]:
    """The manifest of a merged model directory (None for a plain model); a forget adapter is refused."""
    from .adapters import MANIFEST_NAME, manifest_kind, read_manifest

    if not Path(model_name, MANIFEST_NAME).is_file():
        return None
    m = read_manifest(model_name)
    if manifest_kind(m) != "merged":
        raise ModelLoadError(f"{model_name} is a forget adapter, not a model: pass it as --adapter")
    return m


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_base_model(model_name: str, quantize: bool = True, compute_dtype: str = "auto",
                    gguf_file: Optional[str] = None, trust_remote_code: bool = False,
                    device: Optional[torch.device] = None):
    """Load a causal LM, frozen. quantize=True: bitsandbytes NF4 with double quantisation (QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if model_name is None:
        raise ModelLoadError("no base model given (--model)")
    device = device or default_device()
    dtype = resolve_compute_dtype(compute_dtype, device)
    source = (model_name, gguf_file)  # before a GGUF file is swapped for its cached conversion
    if gguf_file and quantize:
        model_name, gguf_file = str(gguf_as_checkpoint(model_name, gguf_file)), None
    kw = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    if quantize:
        import_bitsandbytes()  # before transformers imports it: no kernel fetched from the Hub
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kw["device_map"] = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    _check_exists(model_name)
    _check_merged_model(model_name)
    try:
        with warnings.catch_warnings(), gguf_progress_follows_transformers():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(model_name, **kw)
    except Exception as e:
        raise ModelLoadError(f"cannot load model '{model_name}': {_first_line(e)}") from None
    if not quantize:
        model.to(device)
    else:
        keep_4bit_trainable(model)
        release_checkpoint_map(model)
    model.icu_source = source  # where the weights came from: base_fingerprint hashes those files
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def hidden_size(model_config) -> Optional[int]:
    """The model's hidden width: `hidden_size` (Llama, NeoX, ...) or GPT-2's `n_embd`; None if neither."""
    h = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    return int(h) if h else None


# attributes through which transformers' models read a dropout rate as a plain float at forward time
# (Llama's attention, OPT, Bloom, ...); GPT-2 / GPT-NeoX hold nn.Dropout modules instead
_DROPOUT_RATES = ("dropout", "attention_dropout", "attn_dropout", "hidden_dropout", "activation_dropout",
                  "resid_dropout", "embed_dropout")


@contextlib.contextmanager
def base_dropout_off(*models):
    """The frozen base's dropout off while a forget adapter trains (LoRA's own `lora_dropout` kept).

    Training runs in train mode (HF's gradient checkpointing needs it), so a base whose config has
    dropout (GPT-2: 0.1 on embeddings, attention and residuals) trained the adapter through random
    masks while every score, the stop rule and the user see the model without them: the targets were
    met under noise, and the reference of the KL term and the cached hidden states were noisy copies
    (the KL of a zero adapter to its reference was not zero). Restores every rate on exit; yields how
    many it turned off."""
    saved = []
    for model in models:
        for name, mod in model.named_modules():
            if "lora_dropout" in name:
                continue
            if isinstance(mod, torch.nn.Dropout) and mod.p:
                saved.append((mod, "p", mod.p))
            for attr in _DROPOUT_RATES:
                v = mod.__dict__.get(attr)  # plain attributes only (a module's dropout submodule is above)
                if isinstance(v, float) and v > 0:
                    saved.append((mod, attr, v))
    for mod, attr, _ in saved:
        setattr(mod, attr, 0.0)
    try:
        yield len(saved)
    finally:
        for mod, attr, v in reversed(saved):
            setattr(mod, attr, v)


def release_checkpoint_map(model) -> None:
    """Copy the tensors a 4-bit load left as views of the memory-mapped checkpoint (embeddings, norms).

    Quantizing reads every page of the safetensors file, and while one tensor still points into the
    mapping all of those pages stay resident: ~0.4 GB for a 135M-parameter fp32 checkpoint, more than
    the 4-bit model itself. Owning copies of the few unquantized tensors lets the mapping go.
    """
    import gc

    for p in model.parameters():
        if p.device.type == "cpu" and type(p).__name__ != "Params4bit":
            p.data = p.data.clone()
    gc.collect()


def cache_root() -> Path:
    """$ICU_PEFT_CACHE, else $XDG_CACHE_HOME/icu-peft, else ~/.cache/icu-peft."""
    if os.environ.get("ICU_PEFT_CACHE"):
        return Path(os.environ["ICU_PEFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "icu-peft"


@contextlib.contextmanager
def gguf_progress_follows_transformers():
    """While loading a GGUF file, its conversion bar shows only when transformers' progress bars do.

    transformers dequantizes GGUF tensors under a plain `tqdm.auto` bar that its own
    `disable_progress_bar()` does not reach (and TQDM_DISABLE is read when tqdm is imported), so
    `--no-progress` still drew it on a first run."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # a transformers without GGUF support: nothing draws that bar
        yield
        return
    real = getattr(gguf_utils, "tqdm", None)
    if real is None or hf_logging.is_progress_bar_enabled():
        yield
        return
    gguf_utils.tqdm = functools.partial(real, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = real


def gguf_as_checkpoint(model_name: str, gguf_file: str) -> Path:
    """A safetensors copy of a GGUF model (dequantized), made once and cached.

    transformers refuses to combine a GGUF file with a bitsandbytes config, so a 4-bit load of a GGUF
    model goes through an ordinary checkpoint. The cache key is the GGUF file's sha256.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .adapters import atomic_output_dir, sha256_file

    _check_exists(model_name)
    src = Path(model_name) / gguf_file
    out = cache_root() / f"gguf-{sha256_file(src)[:16]}" if src.is_file() else None
    if out is not None and (out / "config.json").exists():
        return out
    logger.info("dequantizing %s into a cached checkpoint (once per file): %s", gguf_file, out or "?")
    try:
        with gguf_progress_follows_transformers():
            model = AutoModelForCausalLM.from_pretrained(model_name, gguf_file=gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_name, gguf_file=gguf_file)
    except Exception as e:
        raise ModelLoadError(f"cannot load model '{model_name}' ({gguf_file}): {_first_line(e)}") from None
    if out is None:
        raise ModelLoadError(f"GGUF file not found: {src}")
    # the weights are plain tensors after loading; without the GGUF marker save_pretrained writes them
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def keep_4bit_trainable(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns how many layers.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.48 converts a Linear4bit weight to a packed layout
    on its first no-grad eval-mode forward, and keeps it. Forward passes after that go through a
    kernel with no autograd formula, so a LoRA step that follows a scoring pass gets no gradient
    through the frozen layers (silently wrong for Llama, an in-place error for GPT-2). Scoring and
    training alternate in IUR, so the packed path is switched off for the whole run.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def lora_layer_indices(model, last_n: int) -> Optional[list]:
    """Indices of the last `last_n` decoder layers (None: every layer)."""
    if not last_n:
        return None
    total = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not total:
        raise InputError("lora_layers needs a model whose config has num_hidden_layers")
    if not 0 < last_n <= total:
        raise InputError(f"lora_layers must be between 1 and {total} (the model's decoder layers), got {last_n}")
    return list(range(total - last_n, total))


def lora_targets_in_layers(model, target_modules, layers: list) -> list:
    """Full names of the linear modules LoRA should wrap inside the given decoder layers.

    PEFT's own layers_to_transform refuses target_modules='all-linear', so the names are listed:
    every linear layer (or those whose name ends in one of `target_modules`) under `.layers.<i>.`.
    """
    wanted = None if target_modules in (None, "all-linear") else (
        [target_modules] if isinstance(target_modules, str) else list(target_modules))
    keep = {str(i) for i in layers}
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if "layers" not in parts or "Linear" not in type(module).__name__:
            continue
        if any(x.startswith("lora_") or x == "base_layer" for x in parts):  # inside an existing adapter
            continue
        idx = parts.index("layers")
        if idx + 1 >= len(parts) or parts[idx + 1] not in keep:
            continue
        if wanted is None or any(name == w or name.endswith("." + w) for w in wanted):
            names.append(name)
    if not names:
        raise InputError(f"no linear modules to put LoRA on in layers {layers[0]}-{layers[-1]}")
    return names


def attach_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules="all-linear",
                gradient_checkpointing: bool = False, adapter_name: str = "default", last_layers: int = 0):
    """Wrap a frozen base with a fresh LoRA adapter: the only weights that train.

    last_layers: LoRA only in the last N decoder layers (0: all); the backward pass then stops
    there, so steps are faster and hold fewer activations.
    """
    from peft import get_peft_model

    # Not peft's prepare_model_for_kbit_training: it casts every weight that is not 4-bit (embeddings,
    # output head, norms) to fp32, which on a bf16 8B base adds 2 GiB for weights that never train. The
    # loss computes log-softmax in fp32 anyway (losses.py), and the LoRA weights are fp32 (peft upcasts).
    if gradient_checkpointing:
        # context_fn: the recomputation runs under the forward's bf16 products too (lowp.py)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                           "context_fn": checkpoint_contexts})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(model, r, alpha, dropout, target_modules, last_layers), adapter_name=adapter_name)


def lora_config(model, r: int, alpha: int, dropout: float, target_modules, last_layers: int = 0):
    """The LoraConfig of a forget adapter; with last_layers, its targets listed by name in those layers."""
    from peft import LoraConfig

    if last_layers:
        targets = lora_targets_in_layers(model, target_modules, lora_layer_indices(model, last_layers))
    else:
        targets = list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                      task_type="CAUSAL_LM")


def _file_hash_cache() -> Path:
    return cache_root() / "file-sha256.json"


def cached_file_sha256(path: str | Path) -> str:
    """sha256 of a (large) file, remembered per path, size, inode, mtime and ctime.

    A checkpoint is hashed once; any write to it changes its ctime (which no user can set back), so
    a stale entry is never reused for changed bytes.
    """
    import json

    from .adapters import sha256_file

    p = Path(path).resolve()
    st = p.stat()
    stamp = [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    cache_file = _file_hash_cache()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(str(p)) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    digest = sha256_file(p)
    cache = cache if isinstance(cache, dict) else {}
    cache[str(p)] = {"stamp": stamp, "sha256": digest}
    try:  # the cache is an optimisation: an unwritable cache directory costs time, never correctness
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, json.dumps(cache))
    except OSError:
        pass
    return digest


def weight_files(model_name: str, gguf_file: Optional[str] = None) -> Optional[list]:
    """The checkpoint files a model's weights come from (local directory, or the local hub cache)."""
    p = Path(model_name).expanduser()
    if not p.is_dir():
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(model_name, local_files_only=True,
                                       allow_patterns=[gguf_file] if gguf_file else ["*.safetensors"]))
        except Exception:  # not in the local cache (or not a hub id): no file-level fingerprint
            return None
    if gguf_file:
        return [p / gguf_file] if (p / gguf_file).is_file() else None
    files = sorted(p.glob("*.safetensors"))
    return files or None


def weights_fingerprint(model_name: str, gguf_file: Optional[str] = None) -> Optional[str]:
    """sha256 over every weight file of a checkpoint (cached per file); None where the files are unknown."""
    import hashlib as _hashlib

    files = weight_files(model_name, gguf_file)
    if not files:
        return None
    h = _hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{cached_file_sha256(f)}\n".encode())
    return h.hexdigest()


def base_fingerprint(model) -> dict:
    """Identity of a base model that survives 4-bit vs full-precision loading.

    Two parts. `sha256`: the input embeddings (never quantised by bitsandbytes; rounded to bf16, the
    coarsest dtype a user might load in) plus the architecture. `weights_sha256`: every weight file of
    the checkpoint the model was loaded from (streamed once, then cached per file), so a base with any
    weight changed is a different base. A merged model stands for the pristine base its manifest
    names (its own files are verified when it is loaded).
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = getattr(causal, "icu_source", None)
    if source is not None:
        merged = _refuse_adapter(source[0]) if Path(source[0]).is_dir() else None
        if merged is not None and merged.get("base", {}).get("fingerprint"):
            return dict(merged["base"]["fingerprint"])
    cfg = causal.config
    emb = causal.get_input_embeddings().weight.detach()
    h = hashlib.sha256()
    arch = f"{cfg.model_type}|{cfg.vocab_size}|{getattr(cfg, 'hidden_size', '')}|{getattr(cfg, 'num_hidden_layers', '')}"
    h.update(arch.encode())
    h.update(emb.to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().tobytes())
    out = {
        "sha256": h.hexdigest(),
        "model_type": cfg.model_type,
        "vocab_size": int(cfg.vocab_size),
    }
    weights = weights_fingerprint(*source) if source is not None else None
    if weights:
        out["weights_sha256"] = weights
    return out


def load_model_and_tokenizer(config) -> Tuple[object, object]:
    """Base model (frozen, possibly 4-bit) and tokenizer for an ICUConfig."""
    tok = load_tokenizer(config.model, config.gguf_file, config.trust_remote_code)
    model = load_base_model(config.model, config.quantize, config.compute_dtype, config.gguf_file,
                            config.trust_remote_code)
    return model, tok
