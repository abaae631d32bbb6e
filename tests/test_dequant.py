"""Dense copies of the 4-bit base's weights (dequant.py): the same numbers as bitsandbytes, computed once."""

from __future__ import annotations

import torch

from icu_peft.dequant import DenseWeights, attach_dense_weights, budget_bytes, dense_bytes, four_bit_layers


def _lora_nf4(tiny_model_dir):
    from icu_peft.models import attach_lora, load_base_model

    model = attach_lora(load_base_model(str(tiny_model_dir), quantize=True, compute_dtype="float32"))
    with torch.no_grad():  # a non-zero adapter, so the LoRA path is part of what is compared
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def test_dense_layers_compute_what_bitsandbytes_computes_forward_and_backward(tiny_model_dir):
    model = _lora_nf4(tiny_model_dir)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, grads = _loss_and_grads(model, ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    layers = four_bit_layers(model)
    dense = DenseWeights().attach(model, budget=10**12)
    assert dense.layers and len(dense.layers) == len(layers)
    assert dense.bytes == sum(dense_bytes(m) for m in layers)
    dense_loss, dense_grads = _loss_and_grads(model, ids)
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    assert torch.allclose(dense_logits, logits, atol=1e-5)
    assert torch.allclose(dense_loss, loss, atol=1e-6)
    for n in grads:  # the adapter's gradients flow through the dense copy as through the packed weight
        assert torch.allclose(dense_grads[n], grads[n], atol=1e-5), n

    dense.detach()
    assert not any("forward" in m.__dict__ for m in layers)  # bitsandbytes' own forward is back
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, logits, atol=1e-6)


def test_budget_takes_the_top_layers_first_and_stops_where_it_is_spent(tiny_model_dir):
    model = _lora_nf4(tiny_model_dir)
    layers = four_bit_layers(model)
    top_two = dense_bytes(layers[-1]) + dense_bytes(layers[-2])
    dense = DenseWeights().attach(model, budget=top_two)
    assert dense.layers == [layers[-1], layers[-2]] and dense.bytes == top_two
    dense.detach()
    assert attach_dense_weights(model, 0, torch.device("cpu")) is None
    assert budget_bytes("auto", torch.device("cuda")) == 0  # bitsandbytes' kernels read packed weights there
    assert budget_bytes(64, torch.device("cpu")) == 64 * 2**20
    assert budget_bytes("auto", torch.device("cpu"), reserve=10**15) == 0  # the precision view comes first


def test_merged_view_kept_dense_gives_the_packed_views_numbers(tiny_model_dir):
    from icu_peft import ICUConfig
    from icu_peft.precision import build_view

    trained = _lora_nf4(tiny_model_dir)
    view = build_view(ICUConfig(model=str(tiny_model_dir), compute_dtype="float32"), trained, torch.device("cpu"))
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with view.as_view(1) as m, torch.no_grad():
        packed = m(input_ids=ids).logits
    used = view.merged.densify(10**12)
    assert used > 0 and view.merged.dense
    with view.as_view(1) as m, torch.no_grad():
        assert torch.allclose(m(input_ids=ids).logits, packed, atol=1e-5)
    with torch.no_grad():  # the adapter moves: refresh re-quantizes and keeps the new weights dense
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    view.merged.refresh()
    assert all(isinstance(view.merged.packed[m], torch.Tensor) for m in view.merged.dense)
    with view.as_view(1) as m, torch.no_grad():
        moved = m(input_ids=ids).logits
    assert not torch.allclose(moved, packed, atol=1e-3)


def test_forget_hands_the_base_back_without_its_dense_copies(tiny_model_dir, tiny_corpus):
    from icu_peft import ICUConfig
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.unlearner import forget

    base = load_base_model(str(tiny_model_dir), quantize=True, compute_dtype="float32")
    tok = load_tokenizer(str(tiny_model_dir))
    cfg = ICUConfig(model=str(tiny_model_dir), max_steps=2, precision_check="off", dequant_cache_mb=64, progress=False)
    result = forget(cfg, tiny_corpus["forget"][:1], tiny_corpus["retain"], tiny_corpus["unseen"],
                    base_model=base, tokenizer=tok)
    assert result.report["steps"] == 2
    assert not any("forward" in m.__dict__ for m in four_bit_layers(result.model))


def test_planner_counts_the_dense_copies_the_request_makes(tiny_model_dir):
    from icu_peft.models import load_base_model
    from icu_peft.planner import load_model_config, plan_memory
    from conftest import quick_config

    mc = load_model_config(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), quantize=True, compute_dtype="float32")
    made = DenseWeights().attach(base, budget=10**12).bytes
    plan = plan_memory(mc, quick_config(tiny_model_dir, precision_check="off"), "cpu", seq_len=16, runtime=0.0)
    assert plan.parts["dense_weights"] == made
    off = plan_memory(mc, quick_config(tiny_model_dir, precision_check="off", dequant_cache_mb=0), "cpu",
                      seq_len=16, runtime=0.0)
    assert off.parts["dense_weights"] == 0 and off.peak_bytes == plan.peak_bytes - made
    assert plan_memory(mc, quick_config(tiny_model_dir, precision_check="off"), "cuda", seq_len=16,
                       runtime=0.0).parts["dense_weights"] == 0
