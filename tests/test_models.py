"""Loading: 4-bit bases stay trainable after an eval pass; fingerprints tell bases apart."""

from pathlib import Path

import pytest
import torch

from icu_peft.models import attach_lora, base_fingerprint, load_base_model


def _lowest_lora_grad(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "layers.0." in n and "lora_B" in n]
    return torch.cat([g.flatten() for g in grads])


def test_lora_gradients_after_an_eval_pass_match_a_fresh_model(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights on an eval forward (AVX512-BF16 CPUs); gradients must survive it."""
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    fresh = attach_lora(load_base_model(str(tiny_model_dir), quantize=True))
    torch.manual_seed(0)
    for n, p in fresh.named_parameters():  # B = 0 at init: give it values so every path carries gradient
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    g_fresh = _lowest_lora_grad(fresh, ids)

    scored = attach_lora(load_base_model(str(tiny_model_dir), quantize=True))
    lora = {n: p for n, p in fresh.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in scored.named_parameters():
            if n in lora:
                p.copy_(lora[n])
    scored.eval()
    with torch.no_grad():
        scored(input_ids=ids)  # the IUR scoring pass that used to break the next step
    g_scored = _lowest_lora_grad(scored, ids)
    assert g_fresh.abs().sum() > 0
    assert torch.allclose(g_fresh, g_scored, atol=1e-6)


def test_fingerprint_same_across_precisions_and_differs_between_bases(tiny_model_dir, tmp_path):
    from icu_peft.testing import build_tiny_memorizer

    a = base_fingerprint(load_base_model(str(tiny_model_dir), quantize=True))
    b = base_fingerprint(load_base_model(str(tiny_model_dir), quantize=False))
    assert a["sha256"] == b["sha256"]
    other = tmp_path / "other"
    build_tiny_memorizer(other, ["record 1: oak elm."], steps=1, seed=5)
    assert base_fingerprint(load_base_model(str(other), quantize=False))["sha256"] != a["sha256"]


def test_lora_layers_puts_lora_in_the_last_layers_only(tiny_model_dir):
    from icu_peft.errors import InputError
    from icu_peft.models import attach_lora, load_base_model, lora_layer_indices

    base = load_base_model(str(tiny_model_dir), quantize=False)
    total = base.config.num_hidden_layers
    assert lora_layer_indices(base, 0) is None
    assert lora_layer_indices(base, 1) == [total - 1]
    with pytest.raises(InputError):
        lora_layer_indices(base, total + 1)
    model = attach_lora(base, last_layers=1)
    with_lora = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in model.named_parameters() if "lora_" in n}
    assert with_lora == {total - 1}


def _checkpoint_maps():
    """Address ranges of memory-mapped .safetensors files in this process (Linux)."""
    out = []
    for line in open("/proc/self/maps"):
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            a, b = (int(x, 16) for x in parts[0].split("-"))
            out.append((a, b))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_a_4bit_load_lets_go_of_the_checkpoint_map(tiny_model_dir, monkeypatch):
    """After a 4-bit load no parameter points into the memory-mapped checkpoint (which would keep every
    page quantization read resident), and the copies hold the same values."""
    import icu_peft.models as M
    from safetensors.torch import load_file

    def inside(model):
        maps = _checkpoint_maps()
        return [n for n, p in model.named_parameters() if any(a <= p.data_ptr() < b for a, b in maps)]

    model = load_base_model(str(tiny_model_dir), quantize=True)
    assert inside(model) == []
    saved = load_file(str(tiny_model_dir / "model.safetensors"))
    assert torch.equal(model.get_input_embeddings().weight.detach().float(), saved["model.embed_tokens.weight"].float())
    del model
    # the check can fail: without the release, the unquantized tensors are views of the map
    monkeypatch.setattr(M, "release_checkpoint_map", lambda m: None)
    kept = load_base_model(str(tiny_model_dir), quantize=True)
    assert inside(kept), "expected views of the checkpoint without release_checkpoint_map"


def test_a_path_that_looks_local_fails_at_once(tmp_path, monkeypatch):
    import time

    from icu_peft.errors import ModelLoadError
    from icu_peft.models import load_tokenizer

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("models/smollm2-typo", "my model dir", "./models/x", "a/b/c"):
        t = time.perf_counter()
        with pytest.raises(ModelLoadError, match="model not found"):
            load_tokenizer(name)
        assert time.perf_counter() - t < 5, name  # no hub retries


def test_gguf_conversion_bar_follows_transformers_progress_setting():
    """transformers' GGUF conversion uses a plain tqdm bar of its own; inside the loader's context it is
    disabled exactly when transformers' own bars are, and put back afterwards."""
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as hf_logging

    from icu_peft.models import gguf_progress_follows_transformers

    real = gguf_utils.tqdm
    was = hf_logging.is_progress_bar_enabled()
    try:
        for enabled in (False, True):
            (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
            with gguf_progress_follows_transformers():
                bar = gguf_utils.tqdm(range(2))
                assert bar.disable is (not enabled)
                bar.close()
            assert gguf_utils.tqdm is real
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_base_dropout_off_zeroes_every_rate_but_loras_and_puts_them_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    from icu_peft.models import attach_lora, base_dropout_off

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0))
    model = attach_lora(base, 4, 8, 0.3, "all-linear", False)
    model.train()
    x = torch.randint(0, 64, (2, 12))
    rates = lambda: sorted((n, m.p) for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout))  # noqa: E731
    before = rates()
    assert any(p == 0.1 for _, p in before) and any("lora_dropout" in n and p == 0.3 for n, p in before)
    with base_dropout_off(model) as n:
        assert n == sum(1 for k, p in before if "lora_dropout" not in k and p > 0)
        assert all(p == (0.3 if "lora_dropout" in k else 0.0) for k, p in rates())
        with torch.no_grad():  # LoRA B is zero, so only the base's dropout could make two passes differ
            assert torch.equal(model(x).logits, model(x).logits)
    assert rates() == before
    with torch.no_grad():
        assert not torch.equal(model(x).logits, model(x).logits)  # train mode, dropout back on


def test_the_loop_trains_with_the_bases_dropout_off(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """On a base with attention dropout the first step's KL to the reference (adapter still zero) is 0:
    the reference and the trained pass see the same model. Without base_dropout_off it is not."""
    import contextlib
    import json
    import shutil

    import icu_peft.unlearner as un
    from conftest import quick_config

    d = tmp_path / "dropout_model"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_dropout"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))

    def first_kl():
        r = un.forget(quick_config(d, quantize=False, precision_check="off", max_steps=1, learning_rate=1e-3),
                      tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
        return r.report["history"][1]["l_kl"]

    assert first_kl() == pytest.approx(0.0, abs=1e-7)
    monkeypatch.setattr(un, "base_dropout_off", lambda *models: contextlib.nullcontext(0))
    assert first_kl() > 1e-4


def test_tiny_memorizer_takes_a_given_tokenizer(tmp_path):
    """`tokenizer=DIR` (fresh_memoriser --tokenizer: a real model's BPE) is saved beside the model and sizes its
    vocabulary, instead of a small BPE trained on the texts."""
    from transformers import AutoConfig, AutoTokenizer

    from icu_peft.testing import build_tiny_memorizer, build_tokenizer, random_sentences

    texts = random_sentences(4, seed=3)
    given = build_tokenizer(texts + ["an unrelated vocabulary source text, longer than the others"], tmp_path / "tok",
                            vocab_size=400)
    build_tiny_memorizer(tmp_path / "m", texts, steps=2, hidden=32, tokenizer=tmp_path / "tok")
    saved = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert saved.get_vocab() == given.get_vocab()
    assert AutoConfig.from_pretrained(tmp_path / "m").vocab_size == len(given)
