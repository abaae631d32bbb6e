"""Pristine base + adapters -> a standalone safetensors model (merged in fp32, once)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..adapters import (MANIFEST_NAME, MERGED_FORMAT, atomic_output_dir, inside, check_output_dir, check_stack,
                        load_forget_adapters, manifest_kind, read_manifest, utc_now, verify_files, write_manifest)
from ..errors import InputError, IntegrityError
from ._common import MERGED_SUBDIR, _copy_adapter, _entry, _versions

logger = logging.getLogger("icu_peft")


def _base_weight_hashes(base: str, gguf_file: Optional[str]) -> Optional[Dict[str, str]]:
    """sha256 of a local base's weight files: the proof that a revoke starts from the same bytes."""
    p = Path(base)
    if not p.is_dir():
        return None
    from ..models import cached_file_sha256

    files = [p / gguf_file] if gguf_file else sorted(p.glob("*.safetensors"))
    return {f.name: cached_file_sha256(f) for f in files if f.is_file()}


def _stored_dtype(base: str, gguf_file: Optional[str], trust_remote_code: bool) -> torch.dtype:
    """The dtype the base checkpoint is stored in: what a merged model is written back in."""
    if gguf_file:
        return torch.float32  # transformers dequantizes GGUF; there is no 'stored' float dtype
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception:
        return torch.float32
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def _resolve_dtype(name: str, base: str, gguf_file: Optional[str], trust_remote_code: bool) -> torch.dtype:
    if name in (None, "auto"):
        return _stored_dtype(base, gguf_file, trust_remote_code)
    if name not in ("float32", "bfloat16", "float16"):
        raise InputError(f"unknown dtype '{name}': use auto, float32, bfloat16 or float16")
    return getattr(torch, name)


def merge_adapters(model: str | Path, adapters: Sequence[str | Path], out: str | Path, gguf_file: Optional[str] = None,
                   dtype: str = "auto", force: bool = False, overwrite: bool = False,
                   trust_remote_code: bool = False) -> dict:
    """Merge forget adapters into a full-precision copy of the base and save a standalone model.

    The merge runs in float32 from the pristine checkpoint and the result is cast once to `dtype`
    ('auto' = the dtype the base is stored in). Quantize the saved model at load time if wanted:
    merging into an already-quantized 4-bit base re-quantizes every layer and drifts
    (docs/LIFECYCLE.md). If `model` is itself a merged model, its adapters are re-merged together
    with the new ones from its pristine base, never on top of the merged weights.
    Returns the manifest written to `out/forget_manifest.json`.
    """
    check_output_dir(out, overwrite, inputs=[model, *adapters])
    entries: List[Tuple[Path, dict, Optional[str]]] = []
    history: List[dict] = []
    base = str(model)
    if Path(model, MANIFEST_NAME).is_file():
        m = verify_files(model)
        if manifest_kind(m) != "merged":
            raise InputError(f"{model} is a forget adapter, not a model: pass it as --adapter")
        base, gguf_file = pristine_base(model, m), m["base"].get("gguf_file")
        if dtype in (None, "auto"):
            dtype = m["merge"]["dtype"]
        for e in m["adapters"]:
            d = inside(model, e["relpath"])
            entries.append((d, read_manifest(d), e.get("source")))
        history = list(m.get("history", [])) + [{"op": "merge", "into": Path(model).name, "at": utc_now()}]
        _check_pristine(m, base, force)
    entries += [(d, mm, None) for d, mm in _adapter_manifests(adapters)]
    quantized = [str(mm.get("request_id")) for _, mm, _ in entries if mm.get("base", {}).get("quantized")]
    if quantized:
        logger.warning("%d adapter(s) were trained on a 4-bit base (%s): merged into the full-precision base they "
                       "may forget less; check the merged model with `icu-peft eval --attack quantize` "
                       "(docs/LIFECYCLE.md)", len(quantized), ", ".join(quantized[:3]))
    return _merge_from_pristine(base, gguf_file, entries, out, dtype, force, overwrite, trust_remote_code, history)


def _relative_base(base: str, out: Path) -> str:
    """A local base as a path relative to the merged model (no absolute paths of this machine in the
    manifest; the pair still works when moved together); a hub id as it is."""
    if not Path(base).exists():
        return base
    return os.path.relpath(Path(base).resolve(), out.resolve())


def pristine_base(merged_dir: str | Path, manifest: dict) -> str:
    """Where the pristine base of a merged model is: its recorded path, read relative to the merged model."""
    name = manifest["base"]["name_or_path"]
    if name and not Path(name).is_absolute():
        candidate = Path(merged_dir) / name
        if candidate.exists():
            return str(candidate.resolve())
    return name


def _check_pristine(merged: dict, base: str, force: bool) -> None:
    """The base a merged model came from must still be byte-identical (else revoke is not exact)."""
    want = merged.get("base", {}).get("weight_files")
    if not Path(base).exists():
        raise InputError(f"pristine base '{base}' recorded in the manifest is not found; give --base PATH")
    if not want:
        return
    have = _base_weight_hashes(base, merged["base"].get("gguf_file")) or {}
    if have != want and not force:
        diff = sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have.get(k)]
        raise IntegrityError(f"base '{base}' is not the pristine base this model was merged from "
                             f"(weight file {diff[0]} differs); use --force to accept it anyway")


def _merged_fp32(base: str, gguf_file: Optional[str], dirs: Sequence[Path], force: bool,
                 trust_remote_code: bool) -> tuple:
    """(the base with `dirs` merged in, in float32; the base's fingerprint)."""
    from ..models import base_fingerprint, load_base_model

    model = load_base_model(base, quantize=False, compute_dtype="float32", gguf_file=gguf_file,
                            trust_remote_code=trust_remote_code)
    fp = base_fingerprint(model)
    if dirs:
        model = load_forget_adapters(model, [str(d) for d in dirs], force=force).merge_and_unload()
        model.icu_source = None  # the weights are no longer those of the checkpoint it was loaded from
    return model, fp


def merged_in_memory(model: str | Path, adapters: Sequence[str | Path], gguf_file: Optional[str] = None,
                     force: bool = False, trust_remote_code: bool = False):
    """The float32 model `merge_adapters` would save, kept in memory (checks included, nothing written).

    For checking what a merge does (the demo's "merged, the secrets stay gone") without writing and
    re-reading a full copy of the base.
    """
    pairs = _adapter_manifests(adapters)
    dirs = [d for d, _ in pairs]
    check_stack(dirs, [m for _, m in pairs])
    return _merged_fp32(str(model), gguf_file, dirs, force, trust_remote_code)[0]


def _adapter_manifests(adapters: Sequence[str | Path]) -> List[Tuple[Path, dict]]:
    """(directory, verified manifest) of each adapter; a merged model in their place is an error."""
    out = []
    for d in map(Path, adapters):
        m = verify_files(d)
        if manifest_kind(m) == "merged":
            raise IntegrityError(f"{d} is a merged model, not an adapter")
        out.append((d, m))
    return out


def _merge_from_pristine(base: str, gguf_file: Optional[str], entries: Sequence[Tuple[Path, dict, Optional[str]]],
                         out: str | Path, dtype: str, force: bool, overwrite: bool, trust_remote_code: bool,
                         history: List[dict]) -> dict:
    from ..models import base_fingerprint, load_tokenizer

    dirs = [d for d, _, _ in entries]
    check_stack(dirs, [m for _, m, _ in entries])
    if Path(base).exists():
        base = str(Path(base).resolve())
    target = _resolve_dtype(dtype, base, gguf_file, trust_remote_code)
    weight_hashes = _base_weight_hashes(base, gguf_file)
    tok = load_tokenizer(base, gguf_file, trust_remote_code)
    model, fp = _merged_fp32(base, gguf_file, dirs, force, trust_remote_code)
    model = model.to(target)
    records = [_entry(i, d, m, MERGED_SUBDIR, src) for i, (d, m, src) in enumerate(entries)]
    with atomic_output_dir(out, overwrite) as tmp:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        for (d, _, _), r in zip(entries, records):
            _copy_adapter(d, tmp / r["relpath"])
        manifest = {
            "format": MERGED_FORMAT,
            "kind": "merged",
            "created_at": utc_now(),
            "method": "merge",
            "base": {"name_or_path": _relative_base(base, Path(out)), "gguf_file": gguf_file, "fingerprint": fp,
                     "weight_files": weight_hashes},
            "merge": {"dtype": str(target).replace("torch.", ""), "compute_dtype": "float32",
                      "device": str(next(model.parameters()).device), "order": [r["request_id"] for r in records]},
            "adapters": records,
            "fingerprint": base_fingerprint(model),
            "history": history,
            "versions": _versions(),
        }
        manifest = write_manifest(tmp, manifest)
    return manifest
