"""Several adapters -> one LoRA whose delta is exactly their sum (rank concatenation)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..adapters import (MANIFEST_FORMAT, atomic_output_dir, check_base, check_output_dir, check_stack,
                        leaf_manifests, utc_now, verify_files, write_manifest)
from ..errors import InputError
from ._common import ADAPTER_CONFIG, ADAPTER_WEIGHTS, COMBINED_SUBDIR, _copy_adapter, _entry, _versions


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
