"""A forget adapter's life after training: stack, combine, merge, revoke, inspect, verify.

Every operation is bookkeeping over stock PEFT adapters and `forget_manifest.json`:

    stack    several adapters active at once on one base (PEFT multi-adapter, outputs summed)
    combine  several adapters -> one LoRA whose delta is exactly their sum (rank concatenation)
    merge    pristine base + adapters -> a standalone safetensors model (merged in fp32, once)
    revoke   merged model (or combined adapter) minus some requests -> the same bytes as merging
             (combining) the rest from scratch; needs the pristine base the manifest points to
    inspect  a readable summary of any of the above
    verify   re-score a forget set under a model + stack: the audit

Combined adapters and merged models embed a copy of each adapter they are made of (with its own
manifest), so they can be audited and revoked from the directory alone.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .adapters import (MANIFEST_FORMAT, MANIFEST_NAME, MERGED_FORMAT, adapter_weights_sha256, atomic_output_dir, inside,
                       check_base, check_output_dir, check_stack, copy_directory, leaf_manifests, load_forget_adapters,
                       manifest_kind, read_manifest, utc_now, verify_files, write_manifest)
from .errors import InputError, IntegrityError
from .report import precisions_line

logger = logging.getLogger("icu_peft")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_SUBDIR = "forget_adapters"
COMBINED_SUBDIR = "components"


def _versions() -> dict:
    from .unlearner import library_versions

    return library_versions()


def _entry(i: int, directory: Path, manifest: dict, subdir: str, source: Optional[str] = None) -> dict:
    """How a combined adapter / merged model records one of its parts (no sample text, ever)."""
    rid = str(manifest.get("request_id") or directory.name)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in rid)[:40]
    fgt = manifest.get("forget", {})
    return {
        "request_id": rid,
        "kind": manifest_kind(manifest),
        "relpath": f"{subdir}/{i:02d}_{safe}",
        "source": source if source is not None else Path(directory).name,  # a name, not this machine's layout
        "adapter_sha256": adapter_weights_sha256(manifest),
        "status": manifest.get("status"),
        "created_at": manifest.get("created_at"),
        "forget": {"count": fgt.get("count"), "forgotten": fgt.get("forgotten")},
    }


def _copy_adapter(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)


# ------------------------------------------------------------------------------------ stack

def stack_adapters(base_model, directories: Sequence[str | Path], force: bool = False):
    """All adapters active at once on `base_model` (integrity- and base-checked); a PeftModel."""
    return load_forget_adapters(base_model, [str(d) for d in directories], force=force)


def active_adapters(model) -> List[str]:
    active = model.base_model.active_adapter
    return [active] if isinstance(active, str) else list(active)


def remove_from_stack(model, which: str):
    """Revoke on an unmerged stack: drop one adapter (by PEFT name, request id or directory).

    The others stay active; with none left the base model itself is returned.
    """
    entries = getattr(model, "icu_adapters", [])
    hit = [e for e in entries if which in (e[0], str(e[2].get("request_id")), e[1])
           or (Path(which).exists() and Path(e[1]).resolve() == Path(which).resolve())]
    if not hit:
        names = ", ".join(str(e[2].get("request_id")) for e in entries) or "none"
        raise InputError(f"{which} is not in this stack (stacked requests: {names})")
    name = hit[0][0]
    rest = [e for e in entries if e[0] != name]
    if not rest:
        base = model.unload()
        return base
    model.base_model.set_adapter([e[0] for e in rest])
    model.delete_adapter(name)
    model.base_model.set_adapter([e[0] for e in rest])
    # PeftModel keeps one "active adapter" name of its own (for its config lookups); with several
    # active, delete_adapter leaves it pointing at the deleted one.
    if model.active_adapter not in model.peft_config:
        model.active_adapter = rest[0][0]
    model.icu_adapters = rest
    return model


# ------------------------------------------------------------------------------------ combine

# adapter_config.json keys that would make "concatenate A and B, scale folded in" inexact
_MUST_BE_UNSET = ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform",
                  "trainable_token_indices", "target_parameters", "use_qalora", "layer_replication")


def _read_lora(directory: Path) -> Tuple[dict, Dict[str, Dict[str, torch.Tensor]], float]:
    """(adapter_config, {module path: {'A': tensor, 'B': tensor}}, scaling) of one stock LoRA adapter."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((directory / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{directory}: only LoRA adapters can be combined (peft_type {cfg.get('peft_type')})")
    for k in _MUST_BE_UNSET:
        if cfg.get(k):
            raise InputError(f"{directory}: adapters using '{k}' cannot be combined exactly")
    if cfg.get("bias", "none") != "none":
        raise InputError(f"{directory}: adapters with trained biases cannot be combined exactly")
    scaling = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(directory / ADAPTER_WEIGHTS)).items():
        for part in ("A", "B"):
            suffix = f".lora_{part}.weight"
            if key.endswith(suffix):
                mod = key[: -len(suffix)]
                mod = mod[len("base_model.model."):] if mod.startswith("base_model.model.") else mod
                modules.setdefault(mod, {})[part] = t
                break
        else:
            raise InputError(f"{directory}: tensor {key} is not a plain LoRA A/B matrix; cannot combine")
    return cfg, modules, scaling


def combine_adapters(directories: Sequence[str | Path], out: str | Path, request_id: Optional[str] = None,
                     force: bool = False, overwrite: bool = False) -> dict:
    """One LoRA adapter whose weight delta is exactly the sum of the given adapters' deltas.

    For every module: A = [s_1 A_1; s_2 A_2; ...], B = [B_1, B_2, ...], scaling 1, so
    B A = sum_i s_i B_i A_i (a module missing from an adapter gets zero blocks). Combined inputs
    are flattened into their single-request parts first, so combine(combine(A, B), C) is
    byte-identical to combine(A, B, C) and any part can later be revoked exactly.
    Returns the manifest written to `out/forget_manifest.json`.
    """
    import json

    from safetensors.torch import save_file

    out = check_output_dir(out, overwrite, inputs=list(directories))
    dirs = [Path(d) for d in directories]
    if len(dirs) < 1:
        raise InputError("combine needs at least one --adapter")
    manifests = [verify_files(d) for d in dirs]
    check_stack(dirs, manifests)
    leaves: List[Tuple[Path, dict]] = [leaf for d, m in zip(dirs, manifests) for leaf in leaf_manifests(d, m)]
    fp0 = leaves[0][1].get("base", {}).get("fingerprint", {})
    for d, m in leaves[1:]:
        check_base(m, fp0, where=str(d), force=force)

    cfgs, tensors, scales = [], [], []
    for d, _ in leaves:
        c, t, s = _read_lora(d)
        cfgs.append(c)
        tensors.append(t)
        scales.append(s)
    if len({bool(c.get("fan_in_fan_out")) for c in cfgs}) > 1:
        raise InputError("adapters disagree on fan_in_fan_out; they were made for different layer types")
    modules = sorted(set().union(*[t.keys() for t in tensors]))
    ranks = [c["r"] for c in cfgs]
    total = sum(ranks)
    state: Dict[str, torch.Tensor] = {}
    for mod in modules:
        shape_a = shape_b = None
        for t in tensors:
            if mod in t:
                shape_a, shape_b = t[mod]["A"].shape, t[mod]["B"].shape
                dtype = t[mod]["A"].dtype
                break
        a_parts, b_parts = [], []
        for t, s, r in zip(tensors, scales, ranks):
            if mod in t:
                a_parts.append(t[mod]["A"].float() * s)
                b_parts.append(t[mod]["B"].float())
            else:
                a_parts.append(torch.zeros(r, shape_a[1]))
                b_parts.append(torch.zeros(shape_b[0], r))
        state[f"base_model.model.{mod}.lora_A.weight"] = torch.cat(a_parts, 0).to(dtype).contiguous()
        state[f"base_model.model.{mod}.lora_B.weight"] = torch.cat(b_parts, 1).to(dtype).contiguous()

    cfg = dict(cfgs[0])
    cfg.update(r=total, lora_alpha=total, use_rslora=False, target_modules=modules, lora_dropout=0.0,
               rank_pattern={}, alpha_pattern={}, exclude_modules=None, inference_mode=True)
    if request_id is None:
        import hashlib

        ids = "+".join(str(m.get("request_id")) for _, m in leaves)
        request_id = "combined-" + hashlib.sha256(ids.encode()).hexdigest()[:8]
    entries = [_entry(i, d, m, COMBINED_SUBDIR) for i, (d, m) in enumerate(leaves)]
    with atomic_output_dir(out, overwrite) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for (d, _), e in zip(leaves, entries):
            _copy_adapter(d, tmp / e["relpath"])
        manifest = {
            "format": MANIFEST_FORMAT,
            "kind": "combined",
            "request_id": request_id,
            "created_at": utc_now(),
            "method": "combine",
            "status": "forgotten" if all(m.get("status") == "forgotten" for _, m in leaves) else "partial",
            "base": leaves[0][1].get("base"),
            "lora": {"r": total, "lora_alpha": total, "parts_r": ranks, "parts_scaling": scales},
            "components": entries,
            "forget": {"count": sum(int(e["forget"]["count"] or 0) for e in entries),
                       "forgotten": sum(int(e["forget"]["forgotten"] or 0) for e in entries)},
            "versions": _versions(),
        }
        manifest = write_manifest(tmp, manifest)
    return manifest


# ------------------------------------------------------------------------------------ merge

def _base_weight_hashes(base: str, gguf_file: Optional[str]) -> Optional[Dict[str, str]]:
    """sha256 of a local base's weight files: the proof that a revoke starts from the same bytes."""
    p = Path(base)
    if not p.is_dir():
        return None
    from .models import cached_file_sha256

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
    from .models import base_fingerprint, load_base_model

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
    from .models import base_fingerprint, load_tokenizer

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


# ------------------------------------------------------------------------------------ revoke

def _match(which: str, entries: List[dict], where: Path) -> int:
    """Index of the entry `which` names: an adapter directory (matched by its weights) or a request id."""
    p = Path(which)
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        m = read_manifest(p)
        sha = adapter_weights_sha256(m)
        hits = [i for i, e in enumerate(entries) if e.get("adapter_sha256") == sha]
        label = f"{which} (request {m.get('request_id')})"
        if not hits:
            for i, e in enumerate(entries):
                if e.get("kind") == "combined":
                    inner = [a for _, a in leaf_manifests(inside(where, e["relpath"]))]
                    if any(adapter_weights_sha256(a) == sha for a in inner):
                        raise InputError(f"{label} is part of combined adapter {e['request_id']} in {where}: revoke "
                                         f"it from that combined adapter, then merge the result")
    else:
        hits = [i for i, e in enumerate(entries) if e.get("request_id") == which]
        label = f"request {which}"
    if not hits:
        have = ", ".join(str(e.get("request_id")) for e in entries) or "none"
        raise InputError(f"{label} is not in {where} (it holds: {have})")
    return hits[0]


def revoke(model: str | Path, which: Sequence[str], out: str | Path, base: Optional[str] = None,
           force: bool = False, overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Take requests back out of a merged model or a combined adapter.

    Merged model: the remaining adapters are merged again into the pristine base the manifest
    names (or `base`), exactly as `merge_adapters` would, so the result is tensor-for-tensor the
    merge of the rest. Combined adapter: the remaining parts are combined again (one part left =
    that adapter itself). An unmerged stack needs no tool: stop loading the adapter
    (`remove_from_stack` in Python).
    """
    model = Path(model)
    check_output_dir(out, overwrite, inputs=[model, base])
    m = verify_files(model)
    kind = manifest_kind(m)
    if kind == "adapter":
        raise InputError(f"{model} is a single forget adapter: to revoke it, stop loading it (drop its --adapter)")
    if not which:
        raise InputError("name at least one adapter to revoke (--adapter DIR or request id)")
    entries = m["adapters"] if kind == "merged" else m["components"]
    drop = sorted({_match(w, entries, model) for w in which})
    keep = [e for i, e in enumerate(entries) if i not in drop]
    record = {"op": "revoke", "request_ids": [entries[i]["request_id"] for i in drop], "at": utc_now()}
    if kind == "combined":
        if not keep:
            raise InputError(f"revoking every part of {model} leaves nothing: delete the adapter instead")
        parts = [inside(model, e["relpath"]) for e in keep]
        if len(parts) == 1:
            return read_manifest(copy_directory(parts[0], out, overwrite))
        return combine_adapters(parts, out, force=force, overwrite=overwrite)
    pristine = base or pristine_base(model, m)
    _check_pristine(m, pristine, force)
    kept = [(inside(model, e["relpath"]), read_manifest(inside(model, e["relpath"])), e.get("source")) for e in keep]
    history = list(m.get("history", [])) + [record]
    return _merge_from_pristine(pristine, m["base"].get("gguf_file"), kept, out, m["merge"]["dtype"], force,
                                overwrite, trust_remote_code, history)


# ------------------------------------------------------------------------------------ inspect

def _size_on_disk(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def describe(directory: str | Path) -> dict:
    """Everything `icu-peft inspect` shows, as a dict (no sample text: ids and scores only)."""
    directory = Path(directory)
    m = read_manifest(directory)
    try:
        verify_files(directory, m)
        integrity = "ok"
    except IntegrityError as e:
        integrity = f"FAILED: {e}"
    kind = manifest_kind(m)
    base = m.get("base", {})
    out = {
        "path": str(directory),
        "kind": kind,
        "integrity": integrity,
        "request_id": m.get("request_id"),
        "created_at": m.get("created_at"),
        "method": m.get("method"),
        "status": m.get("status"),
        "base": {"name_or_path": base.get("name_or_path"), "gguf_file": base.get("gguf_file"),
                 "quantized": base.get("quantized"), "fingerprint": base.get("fingerprint", {}).get("sha256")},
        "size_bytes": _size_on_disk(directory),
        "files": len(m.get("files", {})),
    }
    if kind == "adapter":
        cfg = m.get("config", {})
        out["lora"] = {"r": cfg.get("lora_r"), "alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules")}
        out["thresholds"] = m.get("thresholds")
        out["forget"] = m.get("forget")
        out["retain"] = m.get("retain")
        out["precisions"] = m.get("precisions")
        out["epochs"] = m.get("epochs")
        out["wall_time_s"] = m.get("wall_time_s")
        out["samples"] = [{"id": s["id"], "before": s.get("before"), "after": s.get("after"),
                           "forgotten": s.get("forgotten")} for s in m.get("samples", [])]
    else:
        parts = m.get("adapters" if kind == "merged" else "components", [])
        out["forget"] = {"count": sum(int(p["forget"]["count"] or 0) for p in parts),
                         "forgotten": sum(int(p["forget"]["forgotten"] or 0) for p in parts)}
        out["parts"] = []
        for p in parts:
            try:
                d = describe(inside(directory, p.get("relpath")))
                d.pop("samples", None)
            except IntegrityError as e:
                d = {"integrity": f"FAILED: {e}"}
            d.update(request_id=p["request_id"], source=p.get("source"))
            out["parts"].append(d)
        if kind == "merged":
            out["merge"] = m.get("merge")
            out["history"] = m.get("history", [])
        else:
            out["lora"] = m.get("lora")
    return out


def _fmt_scores(block: Optional[dict]) -> str:
    if not block:
        return "-"
    b, a = block.get("before") or {}, block.get("after") or {}
    if not b and not a:
        return "-"
    def num(v) -> str:  # None: not measured (the retain set's EL is off by default)
        return "-" if v is None else f"{v:.3f}"

    parts = []
    for k in ("ma", "el"):
        if b.get(k) is not None or a.get(k) is not None:
            parts.append(f"{k.upper()} {num(b.get(k))} -> {num(a.get(k))}")
    return ", ".join(parts)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def format_description(d: dict, indent: str = "") -> str:
    """The human-readable form of `describe`."""
    lines = []
    add = lines.append
    title = {"adapter": "forget adapter", "combined": "combined forget adapter", "merged": "merged model"}[d["kind"]]
    add(f"{indent}{title}: {d['path']}")
    if d.get("request_id"):
        add(f"{indent}  request id:  {d['request_id']}")
    b = d["base"]
    fp = (b.get("fingerprint") or "")[:12]
    q = " (4-bit at training)" if b.get("quantized") else ""
    add(f"{indent}  base:        {b.get('name_or_path')}{' / ' + b['gguf_file'] if b.get('gguf_file') else ''}"
        f"  [fingerprint {fp}]{q}")
    add(f"{indent}  created:     {d.get('created_at')}   method: {d.get('method')}   status: {d.get('status') or '-'}")
    add(f"{indent}  size:        {_human_size(d['size_bytes'])} in {d['files'] + 1} files   integrity: {d['integrity']}")
    f = d.get("forget") or {}
    add(f"{indent}  forget set:  {f.get('forgotten')} of {f.get('count')} samples forgotten"
        + (f"; {_fmt_scores(f)}" if d["kind"] == "adapter" else ""))
    if d["kind"] == "adapter":
        t = d.get("thresholds") or {}
        if t:
            add(f"{indent}  thresholds:  MA <= {t.get('ma', float('nan')):.3f}, EL <= {t.get('el', float('nan')):.3f} "
                f"({t.get('source')})")
        add(f"{indent}  retain set:  {_fmt_scores(d.get('retain'))}")
        add(f"{indent}  forgotten in: {precisions_line({'precisions': d.get('precisions'), 'forget': f})}")
        lora = d.get("lora") or {}
        add(f"{indent}  LoRA:        r={lora.get('r')} alpha={lora.get('alpha')}   epochs: {d.get('epochs')}   "
            f"train time: {d.get('wall_time_s')} s")
    elif d["kind"] == "merged":
        mg = d.get("merge") or {}
        add(f"{indent}  merged in:   {mg.get('compute_dtype')}, saved as {mg.get('dtype')}")
        for h in d.get("history", []):
            add(f"{indent}  history:     {h.get('op')} {', '.join(h.get('request_ids', [])) or h.get('into', '')} "
                f"at {h.get('at')}")
    if d.get("parts") is not None:
        add(f"{indent}  parts ({len(d['parts'])}): {', '.join(str(p['request_id']) for p in d['parts'])}")
        for p in d["parts"]:
            if "kind" in p:
                lines.append(format_description(p, indent + "    "))
            else:
                add(f"{indent}    {p['request_id']}: integrity {p['integrity']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ verify

def collect_leaves(model) -> List[Tuple[Path, dict]]:
    """Single-request manifests behind a loaded model: its merged adapters and its stacked ones."""
    from .adapters import merged_manifest_of

    leaves: List[Tuple[Path, dict]] = []
    merged = merged_manifest_of(model)
    if merged:
        leaves.extend(leaf_manifests(*merged))
    for _, d, m in getattr(model, "icu_adapters", []):
        leaves.extend(leaf_manifests(d, m))
    return leaves


def match_samples(texts: Sequence[str], leaves: Sequence[Tuple[Path, dict]], id_keys: Sequence[str] = ()):
    """(per text: (its keyed id, the (directory, manifest) that lists it) or None, the keys tried).

    A manifest names its sample-id key by id only; the key comes from this machine's key directory or
    `id_keys` (idkeys.py). Without it none of that manifest's samples can be matched."""
    from .data import sample_id
    from .idkeys import manifest_key

    index = {}
    for d, m in leaves:
        key = manifest_key(m, id_keys)
        for s in m.get("samples", []):
            index.setdefault((key, s["id"]), (d, m))
    salts = list(dict.fromkeys(k for k in (manifest_key(m, id_keys) for _, m in leaves) if k))
    hits = []
    for t in texts:
        ids = ((salt, sample_id(t, salt)) for salt in salts)
        hit = next(((sid, index[(salt, sid)]) for salt, sid in ids if (salt, sid) in index), None)
        hits.append(hit)
    return hits, salts


def verify_forget_set(model, tokenizer, texts: Sequence[str], leaves: Sequence[Tuple[Path, dict]] = (),
                      ma_threshold: Optional[float] = None, el_threshold: Optional[float] = None,
                      unseen: Optional[Sequence[str]] = None, batch_size: int = 16,
                      id_keys: Sequence[str] = ()) -> dict:
    """Re-score a forget set under `model`: per sample MA, EL_n and forgotten or not, plus a summary.

    Each text is matched to the adapter whose manifest lists its keyed id (the key from this
    machine's key directory or `id_keys`, see idkeys.py; without it no text matches); that manifest gives
    its thresholds and EL settings. Explicit thresholds override every manifest; `unseen` text
    scored by the model with every adapter switched off gives thresholds to samples no manifest
    lists (without it they get the strictest thresholds among the manifests).
    """
    from .config import ICUConfig
    from .data import new_salt, sample_id, tokenize_texts
    from .metrics import score_samples
    from .refine import Thresholds, is_forgotten

    if not texts:
        raise InputError("the forget set is empty")
    if (ma_threshold is None) != (el_threshold is None):
        raise InputError("give both --ma-threshold and --el-threshold, or neither")
    defaults = ICUConfig()
    hits, salts = match_samples(texts, leaves, id_keys)
    fallback_salt = salts[0] if salts else new_salt()

    rows = []
    for i, (t, hit) in enumerate(zip(texts, hits)):
        if hit is None:
            rows.append({"index": i, "id": sample_id(t, fallback_salt), "request_id": None, "manifest": None})
        else:
            rows.append({"index": i, "id": hit[0], "request_id": hit[1][1].get("request_id"), "manifest": hit[1][1]})

    def settings(m: Optional[dict]) -> Tuple[int, int, int, str]:
        c = (m or {}).get("config", {}) if m else (leaves[0][1].get("config", {}) if leaves else {})
        return (int(c.get("el_n", defaults.el_n)), int(c.get("el_start", defaults.el_start)),
                int(c.get("max_length", defaults.max_length)), c.get("criterion", "ma_el"))

    explicit = None
    if ma_threshold is not None:
        explicit = Thresholds(ma=ma_threshold, el=el_threshold, source="explicit")
    unseen_t: Dict[Tuple, Thresholds] = {}
    strict = None
    man_ts = [m.get("thresholds") for _, m in leaves if m.get("thresholds")]
    if man_ts:
        strict = Thresholds(ma=min(t["ma"] for t in man_ts), el=min(t["el"] for t in man_ts),
                            bleu=min(t.get("bleu", 0.01) for t in man_ts), source="strictest manifest")

    groups: Dict[Tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(settings(r["manifest"]), []).append(r)
    pad = tokenizer.pad_token_id
    for (el_n, el_start, max_length, criterion), members in groups.items():
        tset = tokenize_texts([texts[r["index"]] for r in members], tokenizer, max_length, fallback_salt,
                              min_tokens=el_n + 1)
        with_bleu = criterion == "bleu"
        sc = score_samples(model, tset.input_ids, pad, el_n, el_start, batch_size, with_bleu=with_bleu)
        need_unseen = explicit is None and any(r["manifest"] is None for r in members) and unseen
        if need_unseen and (el_n, el_start, max_length) not in unseen_t:
            useen = tokenize_texts(unseen, tokenizer, max_length, fallback_salt, min_tokens=el_n + 1, name="unseen")
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _null()
            with ctx:
                us = score_samples(model, useen.input_ids, pad, el_n, el_start, batch_size).mean()
            unseen_t[(el_n, el_start, max_length)] = Thresholds(ma=us["ma"], el=us["el"], source="unseen",
                                                               unseen_count=len(useen))
        for j, r in enumerate(members):
            m = r["manifest"]
            if explicit is not None:
                t = explicit
            elif m is not None and m.get("thresholds"):
                mt = m["thresholds"]
                # the never-seen band's NLL edges too: a sample pushed past them is not forgotten
                t = Thresholds(ma=mt["ma"], el=mt["el"], bleu=mt.get("bleu", 0.01), source=f"manifest {r['request_id']}",
                               nll_lo=mt.get("nll_lo"), nll_hi=mt.get("nll_hi"))
            elif (el_n, el_start, max_length) in unseen_t:
                t = unseen_t[(el_n, el_start, max_length)]
            elif strict is not None:
                t = strict
            else:
                raise InputError("no thresholds for samples that no adapter manifest lists: give --unseen FILE "
                                 "or --ma-threshold and --el-threshold")
            bleu = sc.bleu[j] if sc.bleu is not None else None
            crit = criterion if m is not None and explicit is None else "ma_el"
            r.update(ma=sc.ma[j], el=sc.el[j], nll=sc.nll[j], el_n=el_n, threshold_ma=t.ma, threshold_el=t.el,
                     threshold_source=t.source, criterion=crit,
                     forgotten=is_forgotten(sc.ma[j], sc.el[j], t, bleu, crit, nll=sc.nll[j]))
            if t.nll_lo is not None:
                r.update(band_nll=[t.nll_lo, t.nll_hi])
            if bleu is not None:
                r.update(bleu=bleu, threshold_bleu=t.bleu)
    if explicit is None:
        _chance_outliers_per_request(rows)
    for r in rows:
        r.pop("manifest")
    rows.sort(key=lambda r: r["index"])
    n_ok = sum(r["forgotten"] for r in rows)
    matched = sum(r["request_id"] is not None for r in rows)
    summary = {
        "samples": len(rows), "forgotten": n_ok, "remembered": len(rows) - n_ok, "matched_to_manifest": matched,
        "mean_ma": sum(r["ma"] for r in rows) / len(rows), "mean_el": sum(r["el"] for r in rows) / len(rows),
        "mean_nll": sum(r["nll"] for r in rows) / len(rows),
        "requests": sorted({str(m.get("request_id")) for _, m in leaves}),
        "verdict": "PASS" if n_ok == len(rows) else "FAIL",
    }
    return {"samples": rows, "summary": summary}


def _chance_outliers_per_request(rows: List[dict]) -> None:
    """The forget run's chance allowance (refine.with_chance_outliers), per request, on its manifest's
    never-seen thresholds: verify says what forget said of the same scores."""
    from .refine import Thresholds, with_chance_outliers

    by_request: Dict[str, List[dict]] = {}
    for r in rows:
        mt = (r["manifest"] or {}).get("thresholds") or {}
        if mt.get("source") == "unseen" and r.get("criterion") == "ma_el" and r.get("nll") is not None:
            by_request.setdefault(r["request_id"], []).append(r)
    for members in by_request.values():
        mt = members[0]["manifest"]["thresholds"]
        t = Thresholds(**{k: v for k, v in mt.items() if k in Thresholds.__dataclass_fields__})
        flags = with_chance_outliers([r["forgotten"] for r in members], [r["ma"] for r in members],
                                     [r["el"] for r in members], [r["nll"] for r in members], t)
        for r, f in zip(members, flags):
            if f and not r["forgotten"]:
                r.update(forgotten=True, chance_outlier=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def format_verify_line(r: dict) -> str:
    who = r["request_id"] or "unlisted"
    mark = ("forgotten (over an edge by chance)" if r.get("chance_outlier") else "forgotten") if r["forgotten"] \
        else "REMEMBERED"
    extra = f"  BLEU {r['bleu']:.3f}" if "bleu" in r else ""
    if "band_nll" in r:
        lo, hi = r["band_nll"]
        extra += f"  NLL {r['nll']:.2f} (in {lo:.2f}..{hi:.2f})"
    return (f"{r['id']}  MA {r['ma']:.3f} (<= {r['threshold_ma']:.3f})  EL{r['el_n']} {r['el']:.3f} "
            f"(<= {r['threshold_el']:.3f}){extra}  {'PASS' if r['forgotten'] else 'FAIL'} {mark}  [{who}]")


__all__ = ["stack_adapters", "active_adapters", "remove_from_stack", "combine_adapters", "merge_adapters", "revoke",
           "describe", "format_description", "collect_leaves", "verify_forget_set", "format_verify_line"]
