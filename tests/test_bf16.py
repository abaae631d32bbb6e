"""The bf16 path (what CUDA runs by default) exercised on CPU, so dtype mistakes show up without a GPU."""

import math

import pytest
import torch

from conftest import quick_config


@pytest.mark.parametrize("quantize,extra", [(True, {}), (False, {}),
                                            (True, {"lora_layers": 1, "gradient_checkpointing": True})],
                         ids=["nf4-bf16", "bf16", "nf4-bf16-prefix-cache-checkpointing"])
def test_a_bf16_request_trains_scores_and_forgets(tiny_model_dir, tiny_corpus, tmp_path, quantize, extra):
    from icu_peft.adapters import load_forget_adapters
    from icu_peft.data import tokenize_texts
    from icu_peft.metrics import score_samples
    from icu_peft.models import load_base_model
    from icu_peft.unlearner import forget

    cfg = quick_config(tiny_model_dir, compute_dtype="bfloat16", quantize=quantize, **extra)
    r = forget(cfg, tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"], output_dir=tmp_path / "a")
    rep = r.report
    assert rep["status"] == "forgotten", rep["status"]
    # the base computes in bf16; the adapter's weights stay fp32 (PEFT upcasts them) and learn
    assert r.model.get_input_embeddings().weight.dtype == torch.bfloat16
    lora = [p for n, p in r.model.named_parameters() if "lora_B" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert any(p.abs().sum() > 0 for p in lora)
    checked = rep["precisions"]["checked"]
    if quantize:  # the full-precision view is the bf16 base, and the merged copy NF4
        assert {"nf4", "bfloat16", "nf4_merged"} <= set(checked)
    assert all(math.isfinite(s["after"]["nll"]) for s in rep["samples"])
    if extra.get("lora_layers"):  # the frozen layers below ran once per sample, in bf16
        assert rep["prefix_cache"] and rep["prefix_cache"]["hits"] > 0

    # loaded again in bf16 from its files, the adapter still forgets: scores are finite and past the edge
    base = load_base_model(str(tiny_model_dir), quantize=quantize, compute_dtype="bfloat16")
    model = load_forget_adapters(base, [str(tmp_path / "a")])
    tok = r.tokenizer
    ids = tokenize_texts(tiny_corpus["forget"][:2], tok, cfg.max_length, "00").input_ids
    scores = score_samples(model, ids, tok.pad_token_id, el_n=cfg.el_n)
    assert all(math.isfinite(x) for x in scores.nll)
    assert max(scores.ma) <= rep["band"]["ma_hi"] + 1e-6
