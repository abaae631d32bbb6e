"""icu-peft export: serving-ready copies (vLLM checks, PEFT copy, llama.cpp GGUF LoRA)."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from icu_peft.cli import main


def test_vllm_and_peft_copies_stay_verifiable(tiny_forget_adapter, tmp_path, capsys):
    from icu_peft.adapters import verify_files

    for target in ("vllm", "peft"):
        out = tmp_path / target
        assert main(["export", str(tiny_forget_adapter), "--for", target, "--out", str(out)]) == 0
        verify_files(out)  # manifest, digest and every file hash hold in the copy
        assert "adapter_model.safetensors" in capsys.readouterr().out


def test_vllm_refuses_what_vllm_refuses():
    from icu_peft.export import vllm_problems

    ok = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 4)}
    assert vllm_problems({"r": 8, "bias": "none"}, ok) == []
    bad = vllm_problems({"r": 24, "use_dora": True, "modules_to_save": ["lm_head"], "bias": "all"},
                        {**ok, "base_model.model.model.embed_tokens.lora_A.weight": torch.zeros(8, 4)})
    text = " | ".join(bad)
    assert len(bad) == 5 and "rank 24" in text and "DoRA" in text and "modules_to_save" in text
    assert "bias" in text and "embed_tokens" in text


def test_export_refuses_a_tampered_adapter_and_writes_nothing(tiny_forget_adapter, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_forget_adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["r"] = 16
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    assert main(["export", str(bad), "--for", "vllm", "--out", str(tmp_path / "o")]) == 2
    assert "does not match" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["export", str(tiny_forget_adapter), "--for", "llama.cpp", "--out", str(tmp_path / "o")]) == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_llama_cpp_gguf_holds_the_adapter_in_llama_cpp_layout(tiny_forget_adapter, tiny_model_dir, tmp_path):
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from icu_peft.export import GGUF_NAME, _permute_rows

    out = tmp_path / "gguf"
    assert main(["export", str(tiny_forget_adapter), "--for", "llama.cpp", "--model", str(tiny_model_dir),
                 "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out / GGUF_NAME))
    fields = {k: v for k, v in reader.fields.items()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    cfg = json.loads((tiny_forget_adapter / "adapter_config.json").read_text())
    assert float(fields["adapter.lora.alpha"].parts[-1][0]) == cfg["lora_alpha"]
    got = {t.name: torch.from_numpy(t.data.copy()).reshape([int(x) for x in reversed(t.shape)]) for t in reader.tensors}
    peft = load_file(str(tiny_forget_adapter / "adapter_model.safetensors"))
    assert len(got) == len(peft)
    mc = AutoConfig.from_pretrained(str(tiny_model_dir))
    pre = "base_model.model.model.layers.0."
    a, b = got["blk.0.attn_q.weight.lora_a"], got["blk.0.attn_q.weight.lora_b"]
    # llama.cpp's shapes: lora_a r x in, lora_b out x r (its loader checks a.ne[1] == b.ne[0])
    assert a.shape == peft[pre + "self_attn.q_proj.lora_A.weight"].shape
    assert torch.equal(a, peft[pre + "self_attn.q_proj.lora_A.weight"])
    # q's update lands on llama.cpp's permuted q rows: B's rows permuted as the base weight's are
    delta = peft[pre + "self_attn.q_proj.lora_B.weight"] @ peft[pre + "self_attn.q_proj.lora_A.weight"]
    assert torch.allclose(b @ a, _permute_rows(delta, mc.num_attention_heads), atol=1e-6)
    assert torch.equal(got["blk.0.ffn_down.weight.lora_b"], peft[pre + "mlp.down_proj.lora_B.weight"])
    rec = json.loads((out / "export_manifest.json").read_text())
    assert rec["request_id"] == json.loads((tiny_forget_adapter / "forget_manifest.json").read_text())["request_id"]


def test_llama_cpp_export_refuses_other_architectures():
    from icu_peft.errors import InputError
    from icu_peft.export import gguf_tensors

    with pytest.raises(InputError, match="Llama-architecture"):
        gguf_tensors({}, {}, SimpleNamespace(model_type="gpt2"))


def test_a_combined_adapter_exports_with_its_parts(tiny_forget_adapter, tiny_forget_adapter_b, tmp_path):
    """A combined adapter keeps its parts in subdirectories: the copy must hold them and still verify."""
    from icu_peft.adapters import verify_files
    from icu_peft.lifecycle import combine_adapters

    combine_adapters([tiny_forget_adapter, tiny_forget_adapter_b], tmp_path / "ab")
    assert any(p.is_dir() for p in (tmp_path / "ab").iterdir())
    assert main(["export", str(tmp_path / "ab"), "--for", "vllm", "--out", str(tmp_path / "out")]) == 0
    verify_files(tmp_path / "out")
