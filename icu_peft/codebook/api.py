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
from .config import MASK_MODES, CodebookConfig
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


def stage_tensors(layer) -> Dict[str, torch.Tensor]:
    """What one stage saves: a codebook its code vectors, an SAE its encoder, decoder and scale."""
    if isinstance(layer, CodebookLayer):
        return {"weight": layer.weight}
    return dict(layer.tensors())


def save_codebook(layers, config: CodebookConfig, layer_indices, manifest: dict,
                  output_dir: str | Path, overwrite: bool = False, recovery=None) -> dict:
    """Write the codebook directory atomically (with the recovery PeftModel's adapter, if given); returns the manifest.

    `layers` / `layer_indices`: one stage per bottleneck layer, in layer order. A single codebook stage
    keeps the original file layout ({"weight"}); every other case names its tensors "stage{i}.{name}".
    """
    from safetensors.torch import save_file

    if (recovery is None) != (config.recovery_lora_r == 0):
        raise InputError("a recovery adapter is saved exactly when config.recovery_lora_r > 0")
    if config.kind == "codes" and len(layers) == 1:
        tensors = {"weight": layers[0].weight}
    else:
        tensors = {f"stage{i}.{k}": v for i, lay in enumerate(layers) for k, v in stage_tensors(lay).items()}
    with atomic_output_dir(output_dir, overwrite) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / CODEBOOK_WEIGHTS))
        if recovery is not None:
            recovery.save_pretrained(str(tmp / RECOVERY_DIR), safe_serialization=True,
                                     selected_adapters=[RECOVERY_ADAPTER])
            _flatten_adapter_dir(tmp / RECOVERY_DIR)
        hidden = int(layers[0].weight.shape[1] if isinstance(layers[0], CodebookLayer) else layers[0].w_dec.shape[1])
        cfg = dict(config.to_dict(), layer_index=int(layer_indices[0]), layer_indices=[int(i) for i in layer_indices],
                   hidden_size=hidden)
        (tmp / CODEBOOK_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        body = dict(manifest, format=MANIFEST_FORMAT, kind=KIND_CODEBOOK, method=METHOD)
        final = write_manifest(tmp, body)
    return final


# What each stage of a kind holds, with its shape as a function of (num_codes, hidden size).
_STAGE_SHAPES = {
    "codes": {"weight": lambda n, d: (n, d)},
    "sae": {"w_enc": lambda n, d: (n, d), "b_enc": lambda n, d: (n,), "w_dec": lambda n, d: (n, d),
            "b_dec": lambda n, d: (d,), "scale": lambda n, d: ()},
}


@dataclass
class Codebook:
    """A verified codebook directory, loaded: one stage (codebook or SAE) per layer in `layer_indices`."""

    directory: Path
    manifest: dict
    config: CodebookConfig
    layer_indices: List[int]
    stages: List[Dict[str, torch.Tensor]]
    recovery_dir: Optional[Path] = None  # the recovery LoRA (a PEFT adapter directory), when trained with one

    @property
    def sha256(self) -> str:
        return self.manifest["files"][CODEBOOK_WEIGHTS]

    @property
    def layer_index(self) -> int:
        return self.layer_indices[0]

    @property
    def weight(self) -> torch.Tensor:
        """The first stage's code vectors (a codebook) or decoder directions (an SAE)."""
        return self.stages[0].get("weight", self.stages[0].get("w_dec"))

    @property
    def total_codes(self) -> int:
        """Code (feature) ids run from 0 to this: stage i holds ids [i * num_codes, (i + 1) * num_codes)."""
        return self.config.num_codes * len(self.stages)

    def build_layers(self) -> list:
        out = []
        for tensors in self.stages:
            if self.config.kind == "codes":
                w = tensors["weight"]
                layer = CodebookLayer(w.shape[0], w.shape[1], self.config.k, self.config.similarity, self.config.combine)
            else:
                from .sae import SAELayer

                layer = SAELayer(tensors["w_enc"].shape[0], tensors["w_enc"].shape[1], self.config.k)
            layer.passthrough_ratio = self.config.passthrough_norm_ratio
            with torch.no_grad():
                for name, value in stage_tensors(layer).items():
                    value.copy_(tensors[name])
            for p in layer.parameters():
                p.requires_grad_(False)
            out.append(layer)
        return out

    def build_layer(self):
        """The first stage's module (a one-layer codebook's only one)."""
        return self.build_layers()[0]


def split_codes(codes: Sequence[int], num_codes: int, n_stages: int) -> List[List[int]]:
    """Global code ids -> the local ids of each stage (stage i holds [i * num_codes, (i + 1) * num_codes))."""
    out: List[List[int]] = [[] for _ in range(n_stages)]
    for c in codes:
        c = int(c)
        if not 0 <= c < num_codes * n_stages:
            raise InputError(f"code id {c} is outside [0, {num_codes * n_stages})")
        out[c // num_codes].append(c % num_codes)
    return out


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
        layer_indices = [int(i) for i in raw.pop("layer_indices", [layer_index])]
        # Codebooks saved before sites existed snapped the residual stream; the field's default may differ.
        raw.setdefault("site", "residual")
        raw.setdefault("kind", "codes")  # and before SAEs existed, every one was a codebook
        config = CodebookConfig.from_dict(raw)
        tensors = load_file(str(directory / CODEBOOK_WEIGHTS))
    except (KeyError, ValueError, TypeError, json.JSONDecodeError, SafetensorError) as e:
        raise IntegrityError(f"{directory}: malformed codebook ({e})") from None
    if not layer_indices or layer_indices[0] != layer_index or len(set(layer_indices)) != len(layer_indices):
        raise IntegrityError(f"{directory}: malformed codebook (layer_indices {layer_indices}, layer_index {layer_index})")
    shapes = _STAGE_SHAPES[config.kind]
    if config.kind == "codes" and len(layer_indices) == 1 and set(tensors) == {"weight"}:
        stages = [{"weight": tensors["weight"]}]
    else:
        want = {f"stage{i}.{k}" for i in range(len(layer_indices)) for k in shapes}
        if set(tensors) != want:
            raise IntegrityError(f"{directory}: {CODEBOOK_WEIGHTS} holds {sorted(tensors)[:6]}, expected {sorted(want)[:6]}")
        stages = [{k: tensors[f"stage{i}.{k}"] for k in shapes} for i in range(len(layer_indices))]
    for st in stages:
        for k, shape in shapes.items():
            if tuple(st[k].shape) != shape(config.num_codes, hidden):
                raise IntegrityError(f"{directory}: codebook {k} shape {tuple(st[k].shape)} does not match its config")
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
    return Codebook(directory, manifest, config, layer_indices, stages, recovery_dir)


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
    if mode not in MASK_MODES:
        raise IntegrityError(f"{directory}: unknown mask mode {mode!r}")
    return CodeMask(directory, manifest, codes)


def check_mask_for(mask: CodeMask, codebook: Codebook, where=None) -> None:
    """Refuse a mask made for another codebook (code ids only mean something in their codebook)."""
    want = mask.manifest.get("codebook", {}).get("sha256")
    if want != codebook.sha256:
        raise IntegrityError(f"{where or mask.directory} was made for another codebook "
                             f"(sha256 {str(want)[:12]}, this one {codebook.sha256[:12]})")
    if mask.codes and max(mask.codes) >= codebook.total_codes:
        raise IntegrityError(f"{where or mask.directory}: code id {max(mask.codes)} is outside the codebook")


def combine_masks(masks: Sequence[CodeMask], mode: Optional[str] = None) -> tuple:
    """(union of codes, mode) of several masks; their modes must agree unless `mode` overrides."""
    modes = {m.mode for m in masks}
    if mode is None:
        if len(modes) > 1:
            raise InputError(f"the masks disagree on the mode ({', '.join(sorted(modes))}); choose one with --mode")
        mode = modes.pop() if modes else "zero"
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
    """What load_codebook_model leaves on the model (`model.icu_codebook`): the stages (one module per
    bottleneck layer), their hooks, the masks."""

    def __init__(self, layers: list, hooks: list, codebook: Codebook, masks: List[CodeMask], codes: List[int], mode: str,
                 recovery=None):
        self.layers, self.hooks, self.codebook, self.masks = list(layers), list(hooks), codebook, masks
        self.codes, self.mode = codes, mode
        self.recovery = recovery  # PeftModel wrapper of the recovery LoRA (injected in place), or None

    @property
    def layer(self):
        """The first stage (a one-layer codebook's only one)."""
        return self.layers[0]

    def set_codes(self, codes: Sequence[int], mode: Optional[str] = None) -> None:
        self.codes, self.mode = sorted(set(int(c) for c in codes)), mode or self.mode
        apply_codes(self.layers, self.codebook.config.num_codes, self.codes, self.mode)

    def remove(self) -> None:
        """Detach the bottleneck (and the recovery LoRA): the model is the plain base again."""
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.recovery is not None:
            self.recovery.unload()  # puts the base's own linear modules back in place
            self.recovery = None


def apply_codes(layers: Sequence, num_codes: int, codes: Sequence[int], mode: str) -> None:
    """Mask global code ids `codes` across the stages (each gets its own local ids)."""
    for layer, local in zip(layers, split_codes(codes, num_codes, len(layers))):
        layer.set_mask(local, mode)


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
    if codebook.config.kind == "sae" and mode == "block":
        raise InputError("an SAE's features cannot be blocked: use mode 'zero' or 'negate'")
    n_layers = len(decoder_layers(model))
    if max(codebook.layer_indices) >= n_layers:
        raise IntegrityError(f"{codebook_dir}: layer {max(codebook.layer_indices)} does not exist in this base ({n_layers} layers)")
    hidden = getattr((model.get_base_model() if hasattr(model, "get_base_model") else model).config, "hidden_size", None)
    if hidden is not None and hidden != codebook.weight.shape[1]:
        raise IntegrityError(f"{codebook_dir}: codebook width {codebook.weight.shape[1]} != model hidden size {hidden}")
    for i in codebook.layer_indices:  # fail before touching an attached codebook
        site_module(model, i, codebook.config.site)
    layers = codebook.build_layers()
    apply_codes(layers, codebook.config.num_codes, codes, mode)
    old = getattr(model, "icu_codebook", None)
    if old is not None:
        old.remove()
    recovery = _attach_recovery(model, codebook) if codebook.recovery_dir is not None else None
    hooks = [attach(model, layer, i, codebook.config.site) for layer, i in zip(layers, codebook.layer_indices)]
    model.icu_codebook = CodebookHandle(layers, hooks, codebook, masks, codes, mode, recovery)
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
        out.update(bottleneck=cfg.get("kind", "codes"), layer=cfg.get("layer_index"),
                   layers=cfg.get("layer_indices", [cfg.get("layer_index")]), site=cfg.get("site", "residual"),
                   num_codes=cfg.get("num_codes"), k=cfg.get("k"),
                   similarity=cfg.get("similarity"), combine=cfg.get("combine"),
                   codebook_sha256=manifest["files"].get(CODEBOOK_WEIGHTS, "")[:12],
                   recovery_lora_r=cfg.get("recovery_lora_r", 0),
                   perplexity=manifest.get("perplexity"), wall_time_s=manifest.get("wall_time_s"))
    elif kind == KIND_MASK:
        out.update(request_id=manifest.get("request_id"), mode=manifest.get("mode"),
                   codebook_sha256=str(manifest.get("codebook", {}).get("sha256"))[:12],
                   num_codes_masked=len(manifest.get("codes", [])), codes=manifest.get("codes"),
                   requests=[{"request_id": r.get("request_id"), "codes": len(r.get("codes", [])),
                              "topic_samples": r.get("topic", {}).get("count"), "created_at": r.get("created_at"),
                              "status": r.get("status")}  # select auto: 'forgotten' / 'partial' / 'not_name_bound'
                             for r in manifest.get("requests", [])],
                   revoked=manifest.get("revoked", []))
    return out
