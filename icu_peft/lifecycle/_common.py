"""What the lifecycle verbs share: file names, how a combined adapter or merged model records its parts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..adapters import adapter_weights_sha256, manifest_kind

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_SUBDIR = "forget_adapters"
COMBINED_SUBDIR = "components"


def _versions() -> dict:
    from ..unlearner import library_versions

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
