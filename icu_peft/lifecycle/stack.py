"""Several forget adapters active at once on one base (PEFT multi-adapter, outputs summed)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from ..adapters import load_forget_adapters
from ..errors import InputError


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
