"""The quantize attack: merge in float32, reload in NF4 / int8, re-score against the manifests."""

from __future__ import annotations

import json

import pytest
import torch

from icu_peft.cli import main


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def attacked(tiny_model_dir, tiny_corpus, tiny_forget_adapter):
    from icu_peft.attacks import quantize_attack

    return quantize_attack(tiny_model_dir, [tiny_forget_adapter], tiny_corpus["forget"][:2],
                           unseen=tiny_corpus["unseen"])


def test_fp32_row_is_verify_on_the_full_precision_stack(tiny_model_dir, tiny_corpus, tiny_forget_adapter, attacked):
    from icu_peft.adapters import load_forget_adapters
    from icu_peft.lifecycle import collect_leaves, verify_forget_set
    from icu_peft.models import load_base_model, load_tokenizer

    model = load_forget_adapters(load_base_model(str(tiny_model_dir), quantize=False, compute_dtype="float32"),
                                 [str(tiny_forget_adapter)])
    tok = load_tokenizer(str(tiny_model_dir))
    ref = verify_forget_set(model, tok, tiny_corpus["forget"][:2], collect_leaves(model))
    got = attacked["samples"]["fp32"]
    assert [r["forgotten"] for r in got] == [r["forgotten"] for r in ref["samples"]]
    for g, r in zip(got, ref["samples"]):
        assert g["ma"] == pytest.approx(r["ma"], abs=1e-6) and g["nll"] == pytest.approx(r["nll"], abs=1e-4)
    assert set(attacked["schemes"]) == {"fp32", "nf4", "int8"}
    assert 0.0 <= attacked["schemes"]["nf4"]["mia_loss_auc"] <= 1.0


def test_nf4_row_scores_the_saved_merge_reloaded_in_4bit(tiny_model_dir, tiny_corpus, tiny_forget_adapter, attacked,
                                                         tmp_path):
    """The same numbers by another road: `icu-peft merge` to disk, then the library's own NF4 loader."""
    from icu_peft.data import new_salt, tokenize_texts
    from icu_peft.lifecycle import merge_adapters
    from icu_peft.metrics import score_samples
    from icu_peft.models import load_base_model, load_tokenizer

    out = tmp_path / "merged"
    merge_adapters(str(tiny_model_dir), [tiny_forget_adapter], out, dtype="float32")
    q = load_base_model(str(out), quantize=True, compute_dtype="float32")
    tok = load_tokenizer(str(tiny_model_dir))
    seqs = tokenize_texts(tiny_corpus["forget"][:2], tok, 200, new_salt(), min_tokens=2).input_ids
    sc = score_samples(q, seqs, tok.pad_token_id)
    got = attacked["samples"]["nf4"]
    assert [r["ma"] for r in got] == pytest.approx(sc.ma, abs=1e-6)
    assert [r["nll"] for r in got] == pytest.approx(sc.nll, abs=1e-4)
    # and the reload did change the model: NF4 rounding moves the loss
    assert [r["nll"] for r in got] != pytest.approx([r["nll"] for r in attacked["samples"]["fp32"]], abs=1e-6)


def test_recovered_lists_samples_that_came_back():
    from icu_peft.attacks import recovered

    before = {"samples": [{"index": 0, "forgotten": True}, {"index": 1, "forgotten": True},
                          {"index": 2, "forgotten": False}]}
    after = {"samples": [{"index": 0, "forgotten": True}, {"index": 1, "forgotten": False},
                         {"index": 2, "forgotten": False}]}
    assert recovered(before, after) == [1]


def test_cli_attack_on_a_merged_model_and_its_errors(capsys, tiny_model_dir, tiny_corpus, tiny_forget_adapter, tmp_path):
    from icu_peft.lifecycle import merge_adapters

    data = _write(tmp_path / "f.jsonl", tiny_corpus["forget"][:2])
    merged = tmp_path / "merged"
    merge_adapters(str(tiny_model_dir), [tiny_forget_adapter], merged)
    capsys.readouterr()
    assert main(["eval", "--model", str(merged), "--no-quantize", "--data", str(data), "--metrics", "ma",
                 "--attack", "quantize", "--quant-schemes", "int8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["quantize"]
    assert set(r["schemes"]) == {"fp32", "int8"} and r["schemes"]["int8"]["samples"] == 2
    assert r["holds"] == all(v["forgotten"] == v["samples"] for v in r["schemes"].values())
    # a plain base has no manifest to check against; an unknown scheme is refused before loading
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--metrics", "ma",
                 "--attack", "quantize"]) == 2
    assert "needs --adapter" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tiny_forget_adapter), "--data", str(data),
                 "--metrics", "ma", "--attack", "quantize", "--quant-schemes", "fp8"]) == 2
    assert "unknown quantization scheme" in capsys.readouterr().err
