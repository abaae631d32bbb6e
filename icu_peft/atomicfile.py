"""Write a file so that readers see the old one or the whole new one, never a part: a temporary file in
the same directory, then a rename (atomic on POSIX within one file system)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional, Union


def atomic_write(path: Union[str, Path], data: Union[str, bytes], mode: Optional[int] = None) -> None:
    """Replace `path` with `data` (text is written as UTF-8); `mode` sets the permissions before any byte
    is written (keys: 0o600). The temporary file is removed if anything fails; errors propagate."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["atomic_write"]
