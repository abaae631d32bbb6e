"""Keys of the sample ids: the operator keeps them, the shipped artifact does not.

A manifest identifies each forgotten sample by `sha256(key || text)[:16]`. If the key shipped with
the artifact (as the per-request salt once did), anyone holding a candidate text could recompute
its id and confirm it was in the erasure request. So the manifest records only the key's id
(`id_key`, a hash of the key that reveals nothing about it) and the key itself is stored on the
operator's machine, in `$ICU_PEFT_ID_KEYS` or `~/.config/icu-peft/id-keys/<id>.hex` (mode 0600).
`verify` and `eval` find it there to match texts to manifests; an auditor the operator trusts can
be handed the key file (`verify --id-key FILE`). Without the key, verify still checks every text
(against the strictest thresholds of the manifests), it only cannot say which request listed it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Iterable, Optional

from .atomicfile import atomic_write
from .errors import InputError

_HEX = re.compile(r"^[0-9a-f]{16,128}$")


def key_dir() -> Path:
    """$ICU_PEFT_ID_KEYS, else $XDG_CONFIG_HOME/icu-peft/id-keys, else ~/.config/icu-peft/id-keys."""
    if os.environ.get("ICU_PEFT_ID_KEYS"):
        return Path(os.environ["ICU_PEFT_ID_KEYS"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "icu-peft" / "id-keys"


def key_id(key: str) -> str:
    """The public name of a key: a domain-separated hash, useless for recomputing sample ids."""
    return hashlib.sha256(b"icu-peft/id-key/v1\0" + bytes.fromhex(key)).hexdigest()[:16]


def store_key(key: str) -> str:
    """Keep `key` in the operator's key directory (0600); returns its id. Idempotent."""
    kid = key_id(key)
    d = key_dir()
    path = d / f"{kid}.hex"
    if path.is_file():
        return kid
    try:
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(path, key + "\n", 0o600)
    except OSError as e:
        raise InputError(f"cannot store the sample-id key in {d}: {e.strerror or e} (set ICU_PEFT_ID_KEYS to a "
                         f"writable directory)") from None
    return kid


def read_key_file(path: str | Path) -> str:
    """A key from a file as `store_key` writes it (hex, one line)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"id key file not found: {p}")
    key = p.read_text(errors="replace").strip().lower()
    if not _HEX.match(key):
        raise InputError(f"{p} is not an icu-peft sample-id key (hex)")
    return key


def find_key(kid: Optional[str], extra: Iterable[str] = ()) -> Optional[str]:
    """The key whose id is `kid`: from `extra` keys first, then the key directory; None if unknown."""
    if not kid:
        return None
    for key in extra:
        if key_id(key) == kid:
            return key
    path = key_dir() / f"{kid}.hex"
    if path.is_file():
        try:
            key = read_key_file(path)
        except InputError:
            return None
        return key if key_id(key) == kid else None
    return None


def manifest_key(manifest: dict, extra: Iterable[str] = ()) -> Optional[str]:
    """The key of a manifest's sample ids, if this machine (or `extra`) has it.

    Manifests written before keyed ids carried their salt in the clear; it is still honoured.
    """
    if manifest.get("salt"):
        return manifest["salt"]
    return find_key(manifest.get("id_key"), extra)


__all__ = ["key_dir", "key_id", "store_key", "read_key_file", "find_key", "manifest_key"]
