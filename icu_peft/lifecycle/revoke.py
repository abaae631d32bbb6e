"""A merged model (or combined adapter) minus some requests: the same bytes as merging (combining) the rest
from scratch; needs the pristine base the manifest points to."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from ..adapters import (MANIFEST_NAME, adapter_weights_sha256, inside, check_output_dir, copy_directory,
                        leaf_manifests, manifest_kind, read_manifest, utc_now, verify_files)
from ..errors import InputError
from .combine import combine_adapters
from .merge import _check_pristine, _merge_from_pristine, pristine_base


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
