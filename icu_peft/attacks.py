"""Attacks that try to undo a forget request: re-quantizing the merged model.

Zhang et al. (2025, "Catastrophic failure of LLM unlearning via quantization") found that
quantizing an unlearned model to 4 bits restores most of what was forgotten: an unlearning update
smaller than the quantization step rounds away. The attack here is the one a recipient of a merged
model can run: merge the forget adapters into the base in full precision, save it, reload it in
bitsandbytes NF4 and in int8 (LLM.int8()), and re-score the forget set against each adapter's own
thresholds and never-seen band (the audit `verify` runs). The relearning attack lives in
`evaluation.relearn_probe`.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from .errors import InputError, ModelLoadError

logger = logging.getLogger("icu_peft")

QUANT_SCHEMES = ("nf4", "int8")


def quantization_config(scheme: str):
    """The bitsandbytes load settings of a scheme ('nf4' as QLoRA loads it, 'int8' as LLM.int8())."""
    from transformers import BitsAndBytesConfig

    if scheme == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32)
    if scheme == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise InputError(f"unknown quantization scheme '{scheme}' (choose from {', '.join(QUANT_SCHEMES)})")


def load_quantized(directory: str | Path, scheme: str, device: Optional[torch.device] = None):
    """A saved (merged) model reloaded in `scheme`, frozen, in eval mode."""
    from transformers import AutoModelForCausalLM

    from .models import default_device, keep_4bit_trainable

    device = device or default_device()
    where = device.index if device.type == "cuda" and device.index is not None else str(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=quantization_config(scheme),
                                                         device_map={"": where}, dtype=torch.float32)
    except InputError:
        raise
    except Exception as e:
        raise ModelLoadError(f"cannot reload the merged model in {scheme}: {str(e).splitlines()[0] if str(e) else e}") from None
    # the same NF4 arithmetic the forget request was scored with (dequantize, then a float32 matmul),
    # not the packed bf16 CPU kernel some CPUs switch to: a different kernel would move the scores too
    keep_4bit_trainable(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def recovered(before: dict, after: dict) -> list:
    """Indices of samples forgotten in `before` (verify rows) and remembered again in `after`."""
    return [a["index"] for b, a in zip(before["samples"], after["samples"]) if b["forgotten"] and not a["forgotten"]]


def quantize_attack(model_name: str, adapters: Sequence[str | Path], texts: Sequence[str],
                    schemes: Sequence[str] = QUANT_SCHEMES, unseen: Optional[Sequence[str]] = None,
                    gguf_file: Optional[str] = None, force: bool = False, trust_remote_code: bool = False,
                    batch_size: int = 16, workdir: Optional[str | Path] = None) -> dict:
    """Merge `adapters` into `model_name` in float32, reload in each scheme, re-score `texts`.

    `model_name` may instead be a merged model (icu-peft merge) with no `adapters`. Every model is
    scored as `verify` scores it: each sample against the thresholds and never-seen band of the
    manifest that lists it. Returns {"schemes": {"fp32": summary, "nf4": ..., "int8": ...},
    "recovered": {scheme: [sample indices forgotten in fp32 and remembered after reloading]},
    "holds": True when every sample is forgotten in fp32 and in every scheme}; with `unseen`,
    each summary also has the loss attack's AUC of the forget set against it. The merged copy is
    written to a temporary directory (under `workdir` if given) and removed afterwards.
    """
    from .adapters import leaf_manifests, merged_manifest_of
    from .data import new_salt, tokenize_texts
    from .lifecycle import merged_in_memory, verify_forget_set
    from .mia import membership_inference
    from .models import load_base_model, load_tokenizer

    if not texts:
        raise InputError("the quantize attack needs the forget set (--data)")
    model_name = str(model_name)
    schemes = list(dict.fromkeys(schemes))
    for s in schemes:
        quantization_config(s)  # unknown names fail before any loading
    tok = load_tokenizer(model_name, gguf_file, trust_remote_code)
    if adapters:
        leaves = [leaf for d in adapters for leaf in leaf_manifests(d)]
        merged = merged_in_memory(model_name, adapters, gguf_file=gguf_file, force=force,
                                  trust_remote_code=trust_remote_code)
    else:
        merged = load_base_model(model_name, quantize=False, compute_dtype="float32", gguf_file=gguf_file,
                                 trust_remote_code=trust_remote_code)
        found = merged_manifest_of(merged)
        if found is None:
            raise InputError("the quantize attack needs --adapter DIR (or a merged model as --model)")
        leaves = leaf_manifests(*found)
    if not leaves:
        raise InputError("no forget adapter manifest found: nothing to check the forget set against")

    mem = non = None
    if unseen:  # tokenized once: the same ids go through every precision
        max_length = int(leaves[0][1].get("config", {}).get("max_length", 200))
        salt = new_salt()
        mem = tokenize_texts(list(texts), tok, max_length, salt, min_tokens=2).input_ids
        non = tokenize_texts(list(unseen), tok, max_length, salt, min_tokens=2, name="unseen").input_ids

    def score(model) -> dict:
        r = verify_forget_set(model, tok, texts, leaves, unseen=unseen, batch_size=batch_size)
        out = {"summary": r["summary"], "samples": r["samples"]}
        if unseen:
            out["summary"]["mia_loss_auc"] = membership_inference(model, mem, non, tok.pad_token_id,
                                                                  batch_size=batch_size)["loss"]["auc"]
        return out

    results: Dict[str, dict] = {"fp32": score(merged)}
    # LLM.int8() logs one warning per matmul when activations are float32 (it casts them to float16 for
    # the int8 product, which is what an int8 deployment does anyway): thousands of lines per scoring pass
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    bnb_level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    tmp_parent = Path(workdir) if workdir else None
    if tmp_parent is not None:
        tmp_parent.mkdir(parents=True, exist_ok=True)
    holder = [merged]
    del merged  # the helper drops the last reference once the copy is on disk: one model in memory at a time
    try:
        _reload_and_score(holder, schemes, tmp_parent, score, results)
    finally:
        bnb_log.setLevel(bnb_level)
    back = {s: recovered(results["fp32"], results[s]) for s in schemes}
    return {
        "schemes": {k: v["summary"] for k, v in results.items()},
        "samples": {k: [{key: r[key] for key in ("index", "id", "ma", "el", "nll", "forgotten")} for r in v["samples"]]
                    for k, v in results.items()},
        "recovered": back,
        # forgetting holds when every sample is forgotten in every precision, the fp32 merge included
        "holds": all(v["summary"]["forgotten"] == v["summary"]["samples"] for v in results.values()),
    }


def _reload_and_score(holder: list, schemes, tmp_parent, score, results) -> None:
    """Save the model in `holder` to a temporary directory, reload it in each scheme, score it into `results`."""
    with tempfile.TemporaryDirectory(prefix="icu-peft-quantize-", dir=tmp_parent) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            holder[0].save_pretrained(tmp, safe_serialization=True)
        holder.clear()
        gc.collect()
        for s in schemes:
            logger.info("quantize attack: reloading the merged model in %s", s)
            model = load_quantized(tmp, s)
            results[s] = score(model)
            del model
            gc.collect()


__all__ = ["QUANT_SCHEMES", "quantization_config", "load_quantized", "recovered", "quantize_attack"]
