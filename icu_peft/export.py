"""Serving-ready copies of a forget adapter: checked for vLLM, plain PEFT, or converted to a llama.cpp GGUF LoRA.

An adapter is checked (every file against its manifest) before anything is written, and the copy is
written to a temporary directory and renamed. `peft` and `vllm` copy the adapter directory as it is
(manifest, signature and report included, so the copy stays verifiable); `vllm` first refuses what
vLLM would refuse: a rank outside the ranks its LoRA kernels are built for, DoRA, `modules_to_save`,
bias training, or a target module vLLM does not apply LoRA to. `llama.cpp` writes one GGUF LoRA file
in the layout llama.cpp's `convert_lora_to_gguf.py` produces (`general.type` adapter, `adapter.type`
lora, `adapter.lora.alpha`; tensors `<base tensor>.lora_a` (r x in) and `.lora_b` (out x r), the q / k
rows permuted as llama.cpp permutes the base's), for Llama-architecture bases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .adapters import (MANIFEST_NAME, atomic_output_dir, check_output_dir, copy_directory, manifest_kind, sha256_file,
                       verify_files)
from .errors import InputError

TARGETS = ("peft", "vllm", "llama.cpp")
# the ranks vLLM's punica kernels are compiled for (vllm.config.LoRAConfig.max_lora_rank's choices)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_RANK = 16
# module names vLLM applies LoRA to in Llama-family models (q/k/v and gate/up are packed there)
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
GGUF_NAME = "forget-adapter.gguf"
EXPORT_MANIFEST = "export_manifest.json"


def _adapter_config(directory: Path) -> dict:
    try:
        cfg = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{directory}: cannot read adapter_config.json ({e})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{directory}: adapter_config.json is not an object")
    return cfg


def _lora_tensors(directory: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def _module_of(key: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> 'model.layers.3.self_attn.q_proj'."""
    name = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    for tag in (".lora_A.", ".lora_B."):
        if tag in name:
            return name.split(tag)[0]
    raise InputError(f"unexpected tensor '{key}' in the adapter (not a LoRA A/B weight)")


def vllm_problems(cfg: dict, tensors: Dict[str, torch.Tensor]) -> List[str]:
    """What vLLM would refuse in this adapter (empty: servable)."""
    out = []
    r = cfg.get("r")
    if r not in VLLM_RANKS:
        out.append(f"rank {r} is not one vLLM supports ({', '.join(map(str, VLLM_RANKS))})")
    if cfg.get("use_dora"):
        out.append("DoRA adapters are not supported by vLLM")
    if cfg.get("modules_to_save"):
        out.append(f"modules_to_save {cfg['modules_to_save']} (vLLM serves LoRA weights only)")
    if cfg.get("bias", "none") != "none":
        out.append(f"bias '{cfg.get('bias')}' (vLLM loads no trained biases)")
    if cfg.get("fan_in_fan_out"):
        out.append("fan_in_fan_out layers (Conv1D) are not supported")
    modules = sorted({_module_of(k).rsplit(".", 1)[-1] for k in tensors})
    unknown = [m for m in modules if m not in VLLM_MODULES]
    if unknown:
        out.append(f"LoRA on {', '.join(unknown)}, which vLLM does not apply LoRA to ({', '.join(sorted(VLLM_MODULES))})")
    return out


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary layout for q / k projection rows (convert_hf_to_gguf's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: dict, tensors: Dict[str, torch.Tensor], model_config) -> Dict[str, torch.Tensor]:
    """The adapter's tensors under llama.cpp's names, q / k B rows permuted like the base's weights."""
    import gguf

    if getattr(model_config, "model_type", None) != "llama":
        raise InputError(f"llama.cpp export supports Llama-architecture bases; this base is "
                         f"'{getattr(model_config, 'model_type', None)}'")
    n_head = model_config.num_attention_heads
    n_kv = getattr(model_config, "num_key_value_heads", None) or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model_config.num_hidden_layers)
    out = {}
    for key, t in tensors.items():
        module = _module_of(key)
        base = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if base is None:
            raise InputError(f"no llama.cpp tensor for '{module}'")
        t = t.detach().float()
        if ".lora_B." in key and module.endswith("q_proj"):
            t = _permute_rows(t, n_head)
        elif ".lora_B." in key and module.endswith("k_proj"):
            t = _permute_rows(t, n_kv)
        out[base + (".lora_a" if ".lora_A." in key else ".lora_b")] = t.contiguous()
    return out


def write_gguf(path: Path, cfg: dict, tensors: Dict[str, torch.Tensor]) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg.get("lora_alpha", cfg.get("r", 8))))
    for name, t in tensors.items():
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_adapter(src: str | Path, out: str | Path, target: str, model: Optional[str] = None,
                   gguf_file: Optional[str] = None, overwrite: bool = False) -> dict:
    """Check `src` and write its `target` form to `out`; returns what was written and any serving note."""
    if target not in TARGETS:
        raise InputError(f"unknown export target '{target}' (choose from {', '.join(TARGETS)})")
    src = Path(src)
    if not (src / MANIFEST_NAME).is_file():
        raise InputError(f"{src}: not an icu-peft adapter (no {MANIFEST_NAME})")
    manifest = verify_files(src)  # integrity before anything is read for serving
    kind = manifest_kind(manifest)
    if kind not in ("adapter", "combined"):
        raise InputError(f"{src}: a {kind} model is not an adapter; export serves adapters")
    cfg = _adapter_config(src)
    tensors = _lora_tensors(src)
    note = None
    if target == "vllm":
        problems = vllm_problems(cfg, tensors)
        if problems:
            raise InputError(f"{src}: vLLM would refuse this adapter: {'; '.join(problems)}")
        if cfg["r"] > VLLM_DEFAULT_MAX_RANK:
            note = f"rank {cfg['r']} exceeds vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_RANK}: serve with --max-lora-rank {cfg['r']}"
    if target == "llama.cpp":
        if not model:
            raise InputError("the llama.cpp export needs the base model (--model) for its architecture and head counts")
        from transformers import AutoConfig

        try:
            mc = AutoConfig.from_pretrained(model, gguf_file=gguf_file) if gguf_file else AutoConfig.from_pretrained(model)
        except Exception as e:  # noqa: BLE001 - any load failure is the same user error
            raise InputError(f"cannot read the base model's config from '{model}': {str(e).splitlines()[0]}") from None
        converted = gguf_tensors(cfg, tensors, mc)
    check_output_dir(out, overwrite, inputs=[src])
    if target in ("peft", "vllm"):
        written = sorted(p.name for p in copy_directory(src, out, overwrite).iterdir())
    else:
        with atomic_output_dir(out, overwrite) as tmp:
            write_gguf(tmp / GGUF_NAME, cfg, converted)
            record = {"format": "icu-peft/export/v1", "target": target, "request_id": manifest.get("request_id"),
                      "source_manifest_sha256": manifest.get("manifest_sha256"),
                      "file": GGUF_NAME, "sha256": sha256_file(tmp / GGUF_NAME),
                      "lora_alpha": cfg.get("lora_alpha"), "r": cfg.get("r")}
            (tmp / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
            written = [GGUF_NAME, EXPORT_MANIFEST]
    return {"target": target, "out": str(out), "files": written, "note": note}


__all__ = ["TARGETS", "VLLM_RANKS", "VLLM_MODULES", "vllm_problems", "gguf_tensors", "write_gguf", "export_adapter"]
