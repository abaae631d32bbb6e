"""The per-request report: files, contents, plots, the no-matplotlib path, and no forgotten text."""

from __future__ import annotations

import json
import sys

import pytest

from icu_peft.report import PLOT_FORGET_RETAIN, PLOT_IUR, PLOT_MIA, REPORT_JSON, REPORT_MD, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_report(with_history=True, with_mia=True):
    ids = ["a1b2c3d4e5f60718", "0f1e2d3c4b5a6978"]
    r = {
        "request_id": "req-test", "status": "forgotten", "method": "icu", "epochs": 3, "steps": 3,
        "base": {"name_or_path": "tiny", "quantized": True, "fingerprint": {"sha256": "ab" * 32}},
        "config": {"el_n": 10},
        "thresholds": {"ma": 0.4, "el": 0.05, "source": "unseen"},
        "forget": {"count": 2, "forgotten": 2, "before": {"ma": 0.95, "el": 0.9}, "after": {"ma": 0.3, "el": 0.0}},
        "retain": {"before": {"ma": 0.9, "el": 0.8}, "after": {"ma": 0.85, "el": 0.7}},
        "samples": [{"id": i, "tokens": 40, "before": {"ma": 0.95, "el": 0.9}, "after": {"ma": 0.3, "el": 0.0},
                     "forgotten": True, "epochs_active": 3} for i in ids],
        "history": [{"epoch": e, "active": 2 - e // 2, "ma_mean": 0.95 - 0.2 * e, "el_mean": 0.9 - 0.3 * e}
                    for e in range(4)],
        "files": {"adapter_model.safetensors": "00"},
    }
    if with_history:
        r["per_sample_history"] = {i: {"ma": [0.95, 0.7, 0.5, 0.3], "el": [0.9, 0.5, 0.1, 0.0]} for i in ids}
    if with_mia:
        r["mia"] = {"before": {"loss": {"auc": 1.0, "tpr_at_5fpr": 1.0, "members": [-0.1, -0.2],
                                        "non_members": [-2.0, -3.0, -2.5]}},
                    "after": {"loss": {"auc": 0.5, "tpr_at_5fpr": 0.0, "members": [-2.0, -3.0],
                                       "non_members": [-2.0, -3.0, -2.5]}}}
    return r


def test_write_report_files_and_contents(tmp_path):
    paths = write_report(synthetic_report(), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(["README.md", REPORT_JSON, REPORT_MD, PLOT_IUR, PLOT_FORGET_RETAIN, PLOT_MIA])
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    assert data["request_id"] == "req-test" and "files" not in data  # the manifest's hashes are not the report's
    md = (tmp_path / REPORT_MD).read_text()
    for needle in ("# Forget request req-test", "a1b2c3d4e5f60718", "| forget | after | 0.3000 | 0.0000 |",
                   "| after | loss | 0.5000 |", f"]({PLOT_IUR})", "EL10"):
        assert needle in md, needle


def test_report_without_optional_sections(tmp_path):
    r = synthetic_report(with_history=False, with_mia=False)
    names = {p.name for p in write_report(r, tmp_path)}
    assert PLOT_MIA not in names
    assert PLOT_IUR in names  # falls back to the per-epoch means
    assert "Membership inference" not in (tmp_path / REPORT_MD).read_text()


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    names = {p.name for p in write_report(synthetic_report(), tmp_path)}
    assert names == {"README.md", REPORT_JSON, REPORT_MD}
    assert not list(tmp_path.glob("*.png"))
    assert "matplotlib is not installed" in (tmp_path / REPORT_MD).read_text()


def test_forget_adapter_carries_a_hashed_report_without_text(tiny_forget_adapter, tiny_corpus):
    from icu_peft.adapters import verify_files

    manifest = verify_files(tiny_forget_adapter)  # report files are hashed; verification passes
    for name in (REPORT_JSON, REPORT_MD, PLOT_IUR, PLOT_FORGET_RETAIN):
        assert name in manifest["files"], name
    # no per-sample history or attack score lists ship (disclosure.py), so no ROC plot either
    assert PLOT_MIA not in manifest["files"] and "per_sample_history" not in manifest
    assert all(set(s) <= {"id", "forgotten", "band", "epochs_active"} for s in manifest["samples"])
    assert json.loads((tiny_forget_adapter / REPORT_JSON).read_text())["samples"] == manifest["samples"]
    mia = manifest["mia"]
    assert set(mia) == {"before", "after"} and mia["before"]["loss"]["auc"] > 0.9  # memorised before
    assert "members" not in mia["before"]["loss"]
    # no forgotten (or any corpus) text in any file of the adapter directory
    blobs = {p.name: p.read_bytes() for p in tiny_forget_adapter.iterdir() if p.is_file()}
    for text in tiny_corpus["forget"] + tiny_corpus["unseen"]:
        words = text.split(" ")
        for i in range(1, len(words) - 3):
            chunk = " ".join(words[i:i + 4]).encode()
            for name, blob in blobs.items():
                assert chunk not in blob, f"text found in {name}"


def test_write_report_is_atomic_with_the_adapter(tmp_path, monkeypatch):
    """A failing report write leaves no half-written adapter directory."""
    import icu_peft.unlearner as unlearner

    class Dummy:
        def save_pretrained(self, path, **kw):
            (tmp_path / "never").mkdir(exist_ok=True)

    def boom(report, directory):
        raise RuntimeError("disk full")

    monkeypatch.setattr(unlearner, "write_report", boom)
    out = tmp_path / "adapter"
    with pytest.raises(RuntimeError):
        unlearner.save_forget_adapter(Dummy(), synthetic_report(), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]


def test_the_adapter_readme_is_a_real_card_without_text(tiny_forget_adapter, tiny_corpus):
    card = (tiny_forget_adapter / "README.md").read_text()
    assert "More Information Needed" not in card  # not PEFT's unfilled template
    assert "req-a" in card and "status" in card and "PeftModel.from_pretrained" in card
    for text in tiny_corpus["forget"]:
        assert text[:20] not in card
