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


# --- bf16 products for the frozen weights of training steps on a float32 model (lowp.py) ---

def test_frozen_bf16_matmuls_round_only_the_frozen_products_and_keep_gradients_fp32():
    from icu_peft.lowp import FrozenBf16Matmuls

    torch.manual_seed(0)
    frozen = torch.nn.Linear(64, 96).requires_grad_(False)
    lora = torch.nn.Linear(64, 96, bias=False)  # trainable: must stay fp32 and get its gradient
    x = torch.randn(12, 64, requires_grad=True)
    mode = FrozenBf16Matmuls()
    with mode:
        y = frozen(x) + lora(x)
        y.square().sum().backward()
    exact = frozen(x) + lora(x)
    assert y.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert lora.weight.grad is not None and lora.weight.grad.dtype == torch.float32
    err = (y - exact).abs().max()
    # rounded (bf16 keeps 8 bits of mantissa), but only that much
    assert 0 < err < 0.02 * exact.abs().max()
    # the frozen weight and bias were cast once: a second call reuses the same copies
    copies = {k: v[2] for k, v in mode.cache.items()}
    assert set(copies) == {id(frozen.weight), id(frozen.bias)}
    with mode:
        frozen(x)
    assert all(mode.cache[k][2] is v for k, v in copies.items())
    # a new weight tensor (what a re-quantized view holds) is not served the old copy; clear drops all
    frozen.weight = torch.nn.Parameter(frozen.weight.detach() + 1.0, requires_grad=False)
    with mode:
        y2 = frozen(x)
    assert (y2 - frozen(x)).abs().max() < 0.05 * frozen(x).abs().max()
    mode.clear()
    assert not mode.cache
    # only weights of cache_min_numel elements or more (the loop passes the head's) are kept
    small = FrozenBf16Matmuls(cache_min_numel=frozen.weight.numel() + 1)
    with small:
        y3 = frozen(x)
    assert not small.cache and (y3 - y2).abs().max() == 0


def test_train_dtype_auto_is_bf16_only_where_it_pays(monkeypatch):
    import icu_peft.lowp as lowp

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(lowp, "cpu_has_bf16_matmul", lambda: True)
    assert lowp.resolve_train_dtype("auto", cpu, torch.float32, 576) == torch.bfloat16
    assert lowp.resolve_train_dtype("auto", cpu, torch.float32, 64) is None  # tiny products gain nothing
    assert lowp.resolve_train_dtype("auto", cpu, torch.float32, 256) is None  # cost steps on a 2 x 256 model
    assert lowp.resolve_train_dtype("auto", cpu, torch.bfloat16, 576) is None  # already bf16
    assert lowp.resolve_train_dtype("auto", cuda, torch.float32, 4096) is None
    assert lowp.resolve_train_dtype("float32", cpu, torch.float32, 576) is None
    assert lowp.resolve_train_dtype("bfloat16", cpu, torch.float32, 64) == torch.bfloat16
    monkeypatch.setattr(lowp, "cpu_has_bf16_matmul", lambda: False)
    assert lowp.resolve_train_dtype("auto", cpu, torch.float32, 576) is None
    with pytest.raises(ValueError):
        lowp.resolve_train_dtype("int8", cpu, torch.float32, 576)


@pytest.mark.parametrize("extra", [{}, {"lora_layers": 1, "gradient_checkpointing": True}],
                         ids=["plain", "prefix-cache-checkpointing"])
def test_a_request_with_bf16_training_products_forgets_and_scores_in_fp32(tiny_model_dir, tiny_corpus, tmp_path,
                                                                          extra):
    from icu_peft.unlearner import forget

    # activation checkpointing (the decoder layers with gradient_checkpointing; the loss chunks where the head
    # trains) recomputes in backward: it must recompute with the same bf16 products (lowp.checkpoint_contexts)
    cfg = quick_config(tiny_model_dir, train_dtype="bfloat16", **extra)
    r = forget(cfg, tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"], output_dir=tmp_path / "a")
    rep = r.report
    assert rep["status"] == "forgotten", rep["status"]
    assert rep["train_dtype"] == "bfloat16"
    if not extra:  # the planner counts the head's bf16 copy where the steps keep one
        from transformers import AutoConfig

        from icu_peft.planner import plan_memory

        mcfg = AutoConfig.from_pretrained(str(tiny_model_dir))
        plan = plan_memory(mcfg, cfg, runtime=0.0)
        assert plan.parts["train_dtype_copies"] >= mcfg.vocab_size * mcfg.hidden_size * 2
        assert plan_memory(mcfg, quick_config(tiny_model_dir), runtime=0.0).parts["train_dtype_copies"] == 0
    # the model the user gets is untouched float32; only the steps' frozen products were rounded
    assert r.model.get_input_embeddings().weight.dtype == torch.float32
    assert all(s["forgotten"] for s in rep["samples"])
    if extra:
        return
    # the default on this tiny model keeps fp32 steps
    assert forget(quick_config(tiny_model_dir), tiny_corpus["forget"][:1], tiny_corpus["retain"],
                  tiny_corpus["unseen"]).report["train_dtype"] is None


def test_the_merged_views_drift_is_zero_right_after_a_refresh_under_bf16_products(tiny_model_dir):
    """Under the bf16 mode of the training steps the live LoRA product and its refresh-time snapshot must
    be computed alike: right after a refresh the drift is exactly zero."""
    from icu_peft import ICUConfig
    from icu_peft.lowp import FrozenBf16Matmuls
    from icu_peft.models import attach_lora, load_base_model
    from icu_peft.precision import build_view

    trained = attach_lora(load_base_model(str(tiny_model_dir), quantize=True, compute_dtype="float32"))
    view = build_view(ICUConfig(model=str(tiny_model_dir), compute_dtype="float32"), trained, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    view.merged.refresh()
    layer = view.merged.lora[0]
    x = torch.randn(2, 5, layer.base_layer.in_features if hasattr(layer.base_layer, "in_features") else 8,
                    generator=gen)
    assert view.merged.drift(layer, x) is None  # nothing wrote to the adapter since the refresh: skipped
    with torch.no_grad():  # written to, values unchanged: the drift is computed, and must come out zero
        for n, p in trained.named_parameters():
            if p.requires_grad:
                p.add_(0.0)
    with FrozenBf16Matmuls(torch.bfloat16):
        assert torch.count_nonzero(view.merged.drift(layer, x)) == 0
