"""What a shipped forget adapter says about the text it forgot (disclosure.py): no per-sample score."""

import json
import re

import pytest

from icu_peft.disclosure import DIGITS, public_report


def _report():
    return {
        "status": "forgotten", "config": {"learning_rate": 0.000123456},
        "samples": [{"id": "ab12", "tokens": 58, "before": {"ma": 0.9649122, "nll": 0.0602147}, "after": {"ma": 0.17},
                     "forgotten": True, "band": "inside", "epochs_active": 88}],
        "per_sample_history": {"ab12": {"ma": [0.96, 0.5]}},
        "mia": {"before": {"loss": {"auc": 1.0, "tpr_at_5fpr": 1.0, "members": [-0.0602147], "non_members": [-3.0]}},
                "after": {"loss": {"auc": 0.5104166, "tpr_at_5fpr": 0.0, "members": [-3.88], "non_members": [-2.9]}}},
        "forget": {"count": 1, "forgotten": 1, "before": {"ma": 0.9587304, "nll": 0.0805576}, "after": {"nll": 3.943911}},
        "history": [{"epoch": 0, "step": 0, "active": 1, "lr": 0.0002, "retain_ma": 0.9693489, "nll_mean": 0.0787012,
                     "loss": 1.964417, "loss_auc": 0.5104166}],
        "targets": {"mean_nll": 4.3739937},
        "precisions": {"trained_on": "nf4", "checked": {"nf4": {"forgotten": 1, "before": {"nll": 0.0805576},
                                                               "after": {"nll": 3.943911}}}},
        "band": {"nll_lo": 3.1072741746902466}, "retain": {"after": {"ma": 0.9647343423631456}},
    }


def test_public_report_keeps_verdicts_and_drops_every_per_sample_score():
    full = _report()
    pub = public_report(full)
    assert pub["samples"] == [{"id": "ab12", "forgotten": True, "band": "inside", "epochs_active": 88}]
    assert "per_sample_history" not in pub
    assert pub["mia"]["after"]["loss"] == {"auc": 0.51, "tpr_at_5fpr": 0.0}  # the lists gone, the AUC rounded
    assert pub["forget"]["before"] == {"ma": 0.96, "nll": 0.08} and pub["forget"]["count"] == 1
    row = pub["history"][0]
    assert row["nll_mean"] == 0.08 and row["loss"] == 1.96 and row["loss_auc"] == 0.51
    assert row["lr"] == 0.0002 and row["retain_ma"] == 0.9693489  # bookkeeping and kept text: exact
    assert pub["targets"]["mean_nll"] == 4.37
    assert pub["precisions"]["checked"]["nf4"]["after"] == {"nll": 3.94}
    # never-seen text (the band), the kept text and the settings are not the request's: as they were
    assert pub["band"] == full["band"] and pub["retain"] == full["retain"] and pub["config"] == full["config"]
    assert pub["disclosure"] == {"per_sample_scores": False, "digits": DIGITS}
    assert full["samples"][0]["before"]["nll"] == 0.0602147  # the operator's report is untouched


def test_a_shipped_adapter_holds_no_score_of_its_forgotten_text(tiny_forget_adapter, tiny_model_dir, tiny_corpus):
    """With the public base and a candidate text, nothing in the adapter's directory matches the text's own
    scores: its NLL under the base or under the base with the adapter, to more than DIGITS decimals."""
    from icu_peft.adapters import load_forget_adapters
    from icu_peft.data import tokenize_texts
    from icu_peft.metrics import score_samples
    from icu_peft.models import load_base_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ids = tokenize_texts(tiny_corpus["forget"][:2], tok, 128, "00").input_ids
    base = load_base_model(str(tiny_model_dir), quantize=True)
    before = score_samples(base, ids, tok.pad_token_id, el_n=10)
    after = score_samples(load_forget_adapters(base, [str(tiny_forget_adapter)]), ids, tok.pad_token_id, el_n=10)
    blob = "\n".join(p.read_text(errors="ignore") for p in tiny_forget_adapter.rglob("*")
                     if p.is_file() and p.suffix in (".json", ".md"))
    numbers = [float(x) for x in re.findall(r"-?\d+\.\d{3,}", blob)]
    for nll in list(before.nll) + list(after.nll):
        assert not any(abs(x - nll) < 5e-4 or abs(x + nll) < 5e-4 for x in numbers), nll
    manifest = json.loads((tiny_forget_adapter / "forget_manifest.json").read_text())
    assert all(set(s) <= {"id", "forgotten", "band", "epochs_active"} for s in manifest["samples"])
    assert "members" not in json.dumps(manifest["mia"]) and "per_sample_history" not in manifest
