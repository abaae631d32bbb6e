"""Saving, checking and loading codebooks and code masks; the entry point other commands call.

    CODEBOOK_DIR/                        trained once per base model
      codebook.safetensors               {"weight": (num_codes, hidden_size)}
      codebook_config.json               CodebookConfig (with the site) + the resolved layer index and hidden size
      forget_manifest.json               kind "codebook": base fingerprint, perplexity cost, file sha256s
      recovery/                          only with recovery_lora_r > 0: the PEFT LoRA adapter trained jointly
        adapter_model.safetensors        with the codes in the layers after the bottleneck (hashed in the
        adapter_config.json              manifest like every other file; attached and removed with the codebook)

    MASK_DIR/                            one forget request (or a stack of them)
      code_mask.safetensors              {"codes": int64 ids, the union over `requests`}
      forget_manifest.json               kind "code_mask": codebook sha256, mode, per-request code ids
                                         and selection statistics (counts only, samples by salted hash)

`load_codebook_model(base, codebook_dir, mask_dirs)` returns the base causal LM itself with the
bottleneck hooked in and the union of the masks applied: it behaves like any causal LM for
icu_peft.metrics, generation and PEFT (the forget adapters of ICU can sit on top of it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..adapters import (MANIFEST_FORMAT, atomic_output_dir, check_base, read_manifest, utc_now, verify_files,
                        write_manifest)
from ..errors import IntegrityError, InputError
from .config import CodebookConfig
from .layer import CodebookLayer, attach, decoder_layers, site_module

CODEBOOK_WEIGHTS = "codebook.safetensors"
CODEBOOK_CONFIG = "codebook_config.json"
MASK_WEIGHTS = "code_mask.safetensors"
RECOVERY_DIR = "recovery"
RECOVERY_ADAPTER = "codebook_recovery"
RECOVERY_FILES = ("adapter_model.safetensors", "adapter_config.json")
KIND_CODEBOOK = "codebook"
KIND_MASK = "code_mask"
METHOD = "codeunlearn"


# ------------------------------------------------------------------------------ codebook


def save_codebook(layer: CodebookLayer, config: CodebookConfig, layer_index: int, manifest: dict,
                  output_dir: str | Path, overwrite: bool = False, recovery=None) -> dict:
    """Write the codebook directory atomically (with the recovery PeftModel's adapter, if given); returns the manifest."""
    from safetensors.torch import save_file

    if (recovery is None) != (config.recovery_lora_r == 0):
        raise InputError("a recovery adapter is saved exactly when config.recovery_lora_r > 0")
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_file({"weight": layer.weight.detach().float().cpu().contiguous()}, str(tmp / CODEBOOK_WEIGHTS))
        if recovery is not None:
            recovery.save_pretrained(str(tmp / RECOVERY_DIR), safe_serialization=True,
                                     selected_adapters=[RECOVERY_ADAPTER])
            _flatten_adapter_dir(tmp / RECOVERY_DIR)
        cfg = dict(config.to_dict(), layer_index=layer_index, hidden_size=int(layer.weight.shape[1]))
        (tmp / CODEBOOK_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        body = dict(manifest, format=MANIFEST_FORMAT, kind=KIND_CODEBOOK, method=METHOD)
        final = write_manifest(tmp, body)
    return final


@dataclass
class Codebook:
    """A verified codebook directory, loaded."""

    directory: Path
    manifest: dict
    config: CodebookConfig
    layer_index: int
    weight: torch.Tensor
    recovery_dir: Optional[Path] = None  # the recovery LoRA (a PEFT adapter directory), when trained with one

    @property
    def sha256(self) -> str:
        return self.manifest["files"][CODEBOOK_WEIGHTS]

    def build_layer(self) -> CodebookLayer:
        layer = CodebookLayer(self.weight.shape[0], self.weight.shape[1], self.config.k, self.config.similarity,
                              self.config.combine)
        layer.passthrough_ratio = self.config.passthrough_norm_ratio
        with torch.no_grad():
            layer.weight.copy_(self.weight)
        layer.weight.requires_grad_(False)
        return layer


def _kind(manifest: dict, want: str, where) -> None:
    if manifest.get("kind") != want:
        raise IntegrityError(f"{where} is not a {want.replace('_', ' ')} directory (kind: {manifest.get('kind')!r})")


def read_codebook(directory: str | Path) -> Codebook:
    """Verify (sha256 of every file) and load a codebook directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = verify_files(directory)
    _kind(manifest, KIND_CODEBOOK, directory)
    try:
        raw = json.loads((directory / CODEBOOK_CONFIG).read_text())
        layer_index, hidden = int(raw.pop("layer_index")), int(raw.pop("hidden_size"))
        # Codebooks saved before sites existed snapped the residual stream; the field's default may differ.
        raw.setdefault("site", "residual")
        config = CodebookConfig.from_dict(raw)
        weight = load_file(str(directory / CODEBOOK_WEIGHTS))["weight"]
    except (KeyError, ValueError, json.JSONDecodeError, SafetensorError) as e:
        raise IntegrityError(f"{directory}: malformed codebook ({e})") from None
    if tuple(weight.shape) != (config.num_codes, hidden):
        raise IntegrityError(f"{directory}: codebook shape {tuple(weight.shape)} does not match its config")
    recovery_dir = None
    listed = {f"{RECOVERY_DIR}/{name}" for name in RECOVERY_FILES} & set(manifest["files"])
    if config.recovery_lora_r:
        # verify_files has checked the hashes of what is listed; here: the adapter must be listed at all.
        if len(listed) != len(RECOVERY_FILES):
            raise IntegrityError(f"{directory}: recovery_lora_r is {config.recovery_lora_r} but the recovery adapter "
                                 f"files are not all in the manifest")
        recovery_dir = directory / RECOVERY_DIR
    elif listed or (directory / RECOVERY_DIR).exists():
        raise IntegrityError(f"{directory}: has a {RECOVERY_DIR}/ adapter but its config says recovery_lora_r 0")
    return Codebook(directory, manifest, config, layer_index, weight, recovery_dir)


def _flatten_adapter_dir(path: Path) -> None:
    """PEFT saves a named (non-"default") adapter into a sub-directory of that name; keep one flat directory."""
    nested = path / RECOVERY_ADAPTER
    if nested.is_dir():
        for f in nested.iterdir():
            f.replace(path / f.name)
        nested.rmdir()


def _attach_recovery(model, codebook: Codebook):
    """Inject the codebook's recovery LoRA into `model` in place; returns the PeftModel wrapper (for unload)."""
    from peft import PeftModel

    if hasattr(model, "peft_config"):
        raise InputError(f"{codebook.directory} has a recovery LoRA: attach it to a plain base model, "
                         "not one that already carries PEFT adapters")
    try:
        wrapper = PeftModel.from_pretrained(model, str(codebook.recovery_dir), adapter_name=RECOVERY_ADAPTER,
                                            is_trainable=False)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise IntegrityError(f"{codebook.directory}: the recovery adapter does not fit this base ({e})") from None
    return wrapper


# ------------------------------------------------------------------------------ code masks


@dataclass
class CodeMask:
    """A verified code-mask directory: the union of its requests' codes."""

    directory: Optional[Path]
    manifest: dict
    codes: List[int] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return self.manifest["mode"]

    @property
    def requests(self) -> List[dict]:
        return self.manifest["requests"]

    @property
    def request_ids(self) -> List[str]:
        return [r["request_id"] for r in self.requests]


def union_codes(requests: Sequence[dict]) -> List[int]:
    return sorted({int(c) for r in requests for c in r["codes"]})


def write_code_mask(requests: Sequence[dict], mode: str, codebook: dict, base: dict, output_dir: str | Path,
                    overwrite: bool = False, extra: Optional[dict] = None) -> dict:
    """Write a mask directory for `requests` (each with request_id and codes) atomically."""
    from safetensors.torch import save_file

    ids = [r["request_id"] for r in requests]
    if len(set(ids)) != len(ids):
        raise InputError(f"duplicate request ids in one mask: {ids}")
    codes = union_codes(requests)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_file({"codes": torch.tensor(codes, dtype=torch.long)}, str(tmp / MASK_WEIGHTS))
        body = {"format": MANIFEST_FORMAT, "kind": KIND_MASK, "method": METHOD,
                "request_id": ids[0] if len(ids) == 1 else "+".join(ids) if ids else "empty",
                "created_at": utc_now(), "mode": mode, "codebook": codebook, "base": base,
                "codes": codes, "requests": list(requests), **(extra or {})}
        final = write_manifest(tmp, body)
    return final


def read_code_mask(directory: str | Path) -> CodeMask:
    """Verify (sha256 of every file, codes consistent with the manifest) and load a mask directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = verify_files(directory)
    _kind(manifest, KIND_MASK, directory)
    try:
        codes = sorted(int(c) for c in load_file(str(directory / MASK_WEIGHTS))["codes"].tolist())
        requests = manifest["requests"]
        listed = union_codes(requests)
        mode = manifest["mode"]
    except (KeyError, TypeError, ValueError, SafetensorError) as e:
        raise IntegrityError(f"{directory}: malformed code mask ({e})") from None
    if codes != listed or codes != sorted(int(c) for c in manifest.get("codes", [])):
        raise IntegrityError(f"{directory}: the code ids in {MASK_WEIGHTS} do not match the manifest's requests")
    if mode not in ("block", "zero"):
        raise IntegrityError(f"{directory}: unknown mask mode {mode!r}")
    return CodeMask(directory, manifest, codes)


def check_mask_for(mask: CodeMask, codebook: Codebook, where=None) -> None:
    """Refuse a mask made for another codebook (code ids only mean something in their codebook)."""
    want = mask.manifest.get("codebook", {}).get("sha256")
    if want != codebook.sha256:
        raise IntegrityError(f"{where or mask.directory} was made for another codebook "
                             f"(sha256 {str(want)[:12]}, this one {codebook.sha256[:12]})")
    if mask.codes and max(mask.codes) >= codebook.config.num_codes:
        raise IntegrityError(f"{where or mask.directory}: code id {max(mask.codes)} is outside the codebook")


def combine_masks(masks: Sequence[CodeMask], mode: Optional[str] = None) -> tuple:
    """(union of codes, mode) of several masks; their modes must agree unless `mode` overrides."""
    modes = {m.mode for m in masks}
    if mode is None:
        if len(modes) > 1:
            raise InputError(f"the masks disagree on the mode ({', '.join(sorted(modes))}); choose one with --mode")
        mode = modes.pop() if modes else "block"
    seen: Dict[str, List[int]] = {}
    for m in masks:
        for r in m.requests:
            rid = r["request_id"]
            if rid in seen and sorted(seen[rid]) != sorted(r["codes"]):
                raise IntegrityError(f"request {rid} appears in two masks with different codes")
            seen[rid] = r["codes"]
    return sorted({c for m in masks for c in m.codes}), mode


def stack_masks(mask_dirs: Sequence[str | Path], output_dir: str | Path, mode: Optional[str] = None,
                overwrite: bool = False) -> dict:
    """One mask directory holding every request of `mask_dirs` (the union of their codes)."""
    if not mask_dirs:
        raise InputError("no masks to stack")
    masks = [read_code_mask(d) for d in mask_dirs]
    sha = {m.manifest["codebook"].get("sha256") for m in masks}
    if len(sha) > 1:
        raise IntegrityError("the masks were made for different codebooks")
    _, mode = combine_masks(masks, mode)
    requests, seen = [], set()
    for m in masks:
        for r in m.requests:
            if r["request_id"] not in seen:
                seen.add(r["request_id"])
                requests.append(r)
    return write_code_mask(requests, mode, masks[0].manifest["codebook"], masks[0].manifest["base"], output_dir,
                           overwrite, extra={"stacked_from": [m.manifest["request_id"] for m in masks]})


def revoke_mask(mask_dir: str | Path, request_ids: Sequence[str], output_dir: str | Path,
                overwrite: bool = False) -> dict:
    """The mask without the given requests; codes still wanted by another request stay masked."""
    mask = read_code_mask(mask_dir)
    missing = sorted(set(request_ids) - set(mask.request_ids))
    if missing:
        raise InputError(f"{mask_dir} holds no request {', '.join(missing)} (it holds: {', '.join(mask.request_ids) or 'none'})")
    keep = [r for r in mask.requests if r["request_id"] not in set(request_ids)]
    return write_code_mask(keep, mask.mode, mask.manifest["codebook"], mask.manifest["base"], output_dir, overwrite,
                           extra={"revoked": sorted(set(request_ids)) + list(mask.manifest.get("revoked", []))})


# ------------------------------------------------------------------------------ attaching


class CodebookHandle:
    """What load_codebook_model leaves on the model (`model.icu_codebook`): the layer, masks, hook."""

    def __init__(self, layer: CodebookLayer, hook, codebook: Codebook, masks: List[CodeMask], codes: List[int], mode: str,
                 recovery=None):
        self.layer, self.hook, self.codebook, self.masks = layer, hook, codebook, masks
        self.codes, self.mode = codes, mode
        self.recovery = recovery  # PeftModel wrapper of the recovery LoRA (injected in place), or None

    def set_codes(self, codes: Sequence[int], mode: Optional[str] = None) -> None:
        self.codes, self.mode = sorted(set(int(c) for c in codes)), mode or self.mode
        self.layer.set_mask(self.codes, self.mode)

    def remove(self) -> None:
        """Detach the bottleneck (and the recovery LoRA): the model is the plain base again."""
        self.hook.remove()
        if self.recovery is not None:
            self.recovery.unload()  # puts the base's own linear modules back in place
            self.recovery = None


def verify_dir(directory: str | Path, fingerprint: Optional[dict] = None, force: bool = False) -> dict:
    """Check a codebook or code-mask directory (files, kind, internal consistency, base when given)."""
    manifest = read_manifest(directory)
    if manifest.get("kind") == KIND_CODEBOOK:
        read_codebook(directory)
    elif manifest.get("kind") == KIND_MASK:
        read_code_mask(directory)
    else:
        raise IntegrityError(f"{directory} is neither a codebook nor a code mask (kind: {manifest.get('kind')!r})")
    if fingerprint is not None:
        check_base(manifest, fingerprint, where=str(directory), force=force)
    return manifest


def load_codebook_model(base, codebook_dir: str | Path, mask_dirs: Sequence[str | Path] = (), mode: Optional[str] = None,
                        force: bool = False, **load_kw):
    """The base causal LM with the codebook bottleneck hooked in and the union of `mask_dirs` masked.

    `base` is a loaded model (a PeftModel is fine, unless the codebook has a recovery LoRA) or a model name/path for
    icu_peft.models.load_base_model (`load_kw`: quantize, gguf_file, ...). Every directory is
    integrity-checked; the codebook and the masks must belong to this base (unless `force`) and the
    masks to this codebook (always). A model that already carries a codebook gets it replaced.
    Returns the same model object, with `model.icu_codebook` (a CodebookHandle).
    """
    from ..models import base_fingerprint, load_base_model

    model = load_base_model(base, **load_kw) if isinstance(base, (str, Path)) else base
    fp = base_fingerprint(model)
    codebook = read_codebook(codebook_dir)
    check_base(codebook.manifest, fp, where=str(codebook_dir), force=force)
    masks = [read_code_mask(d) for d in mask_dirs]
    for m in masks:
        check_base(m.manifest, fp, where=str(m.directory), force=force)
        check_mask_for(m, codebook)
    codes, mode = combine_masks(masks, mode)
    n_layers = len(decoder_layers(model))
    if codebook.layer_index >= n_layers:
        raise IntegrityError(f"{codebook_dir}: layer {codebook.layer_index} does not exist in this base ({n_layers} layers)")
    hidden = getattr((model.get_base_model() if hasattr(model, "get_base_model") else model).config, "hidden_size", None)
    if hidden is not None and hidden != codebook.weight.shape[1]:
        raise IntegrityError(f"{codebook_dir}: codebook width {codebook.weight.shape[1]} != model hidden size {hidden}")
    site_module(model, codebook.layer_index, codebook.config.site)  # fail before touching an attached codebook
    old = getattr(model, "icu_codebook", None)
    if old is not None:
        old.remove()
    recovery = _attach_recovery(model, codebook) if codebook.recovery_dir is not None else None
    layer = codebook.build_layer()
    layer.set_mask(codes, mode)
    hook = attach(model, layer, codebook.layer_index, codebook.config.site)
    model.icu_codebook = CodebookHandle(layer, hook, codebook, masks, codes, mode, recovery)
    return model


def describe(directory: str | Path) -> dict:
    """A summary of a codebook or mask directory for `inspect` (no text, only ids and numbers)."""
    manifest = read_manifest(directory)
    kind = manifest.get("kind")
    out = {"directory": str(directory), "kind": kind, "method": manifest.get("method"),
           "created_at": manifest.get("created_at"), "base": manifest.get("base", {}).get("name_or_path"),
           "base_fingerprint": (manifest.get("base", {}).get("fingerprint", {}).get("sha256") or "")[:12]}
    if kind == KIND_CODEBOOK:
        cfg = json.loads((Path(directory) / CODEBOOK_CONFIG).read_text())
        out.update(layer=cfg.get("layer_index"), site=cfg.get("site", "residual"), num_codes=cfg.get("num_codes"), k=cfg.get("k"),
                   similarity=cfg.get("similarity"), combine=cfg.get("combine"),
                   codebook_sha256=manifest["files"].get(CODEBOOK_WEIGHTS, "")[:12],
                   recovery_lora_r=cfg.get("recovery_lora_r", 0),
                   perplexity=manifest.get("perplexity"), wall_time_s=manifest.get("wall_time_s"))
    elif kind == KIND_MASK:
        out.update(request_id=manifest.get("request_id"), mode=manifest.get("mode"),
                   codebook_sha256=str(manifest.get("codebook", {}).get("sha256"))[:12],
                   num_codes_masked=len(manifest.get("codes", [])), codes=manifest.get("codes"),
                   requests=[{"request_id": r.get("request_id"), "codes": len(r.get("codes", [])),
                              "topic_samples": r.get("topic", {}).get("count"), "created_at": r.get("created_at")}
                             for r in manifest.get("requests", [])],
                   revoked=manifest.get("revoked", []))
    return out
