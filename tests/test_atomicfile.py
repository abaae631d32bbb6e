"""atomic_write: the whole new file or the old one, never a part, and no temporary file left."""

import os
import stat

import pytest

from icu_peft.atomicfile import atomic_write


def test_replaces_the_file_sets_the_mode_and_leaves_nothing_else(tmp_path):
    p = tmp_path / "k.hex"
    p.write_text("old\n")
    atomic_write(p, "new\n", 0o600)
    assert p.read_text() == "new\n" and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["k.hex"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "ledger.json"
    p.write_text("old")
    with pytest.raises(TypeError):
        atomic_write(p, object())  # neither str nor bytes: fails after the temporary file exists
    assert p.read_text() == "old" and sorted(x.name for x in tmp_path.iterdir()) == ["ledger.json"]
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "x.json", "{}")
