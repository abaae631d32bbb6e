"""The forget ledger: requests kept one by one, served as one consolidated adapter."""

from __future__ import annotations

import json

import pytest

from icu_peft.cli import main
from icu_peft.errors import InputError


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


@pytest.fixture
def tiny_forget_adapter_c(tmp_path, tiny_model_dir, tiny_corpus):
    """A third request: two never-seen texts (a cheap 4-step adapter; only its bookkeeping matters here)."""
    from icu_peft import ICUConfig
    from icu_peft.unlearner import forget

    out = tmp_path / "forget_c"
    forget(ICUConfig(model=str(tiny_model_dir), progress=False, max_steps=4, request_id="req-c",
                     precision_check="off"), tiny_corpus["unseen"][:2], tiny_corpus["retain"],
           tiny_corpus["unseen"][2:], output_dir=out)
    return out


def test_ledger_adds_consolidates_revokes_and_says_when_it_is_stale(tiny_model_dir, tiny_corpus, tiny_forget_adapter,
                                                                   tiny_forget_adapter_b, tiny_forget_adapter_c,
                                                                   tmp_path, capsys):
    from icu_peft import ledger as L
    from icu_peft.adapters import read_manifest, verify_files

    led = tmp_path / "ledger"
    a, b = read_manifest(tiny_forget_adapter)["request_id"], read_manifest(tiny_forget_adapter_b)["request_id"]
    assert main(["ledger", "add", str(led), str(tiny_forget_adapter)]) == 0
    assert main(["ledger", "add", str(led), str(tiny_forget_adapter_b)]) == 0
    assert main(["ledger", "add", str(led), str(tiny_forget_adapter)]) == 2  # the same request twice
    assert "already in the ledger" in capsys.readouterr().err
    verify_files(led / "requests" / a)  # each request's own adapter, intact: the audit trail
    st = L.status(led)
    assert st["active"] == [a, b] and st["not_covered"] == [a, b] and not st["up_to_date"]
    assert main(["ledger", "status", str(led)]) == 3  # stale: nothing served yet
    capsys.readouterr()

    fg = tiny_corpus["forget"]
    data = tmp_path / "d"
    data.mkdir()
    recipe = data / "tiny.yaml"  # the tests' settings for the tiny model (conftest.quick_config)
    recipe.write_text("batch_size: 4\nretain_kl_samples: 12\nseed: 0\nmax_steps: 24\n")
    # the texts must be exactly the active requests' samples
    with pytest.raises(InputError, match=f"request {b}: some of its samples are missing"):
        L.match_texts(led, fg[:3])
    with pytest.raises(InputError, match="not a sample of any active request"):
        L.match_texts(led, fg + tiny_corpus["unseen"][:1])
    rc = main(["ledger", "consolidate", str(led), "--model", str(tiny_model_dir), "--forget", _jsonl(data / "f.jsonl", fg),
               "--retain", _jsonl(data / "r.jsonl", tiny_corpus["retain"]),
               "--unseen", _jsonl(data / "u.jsonl", tiny_corpus["unseen"]), "--no-progress", "--config", str(recipe)])
    cons = json.loads((led / "ledger.json").read_text())["consolidated"]
    from icu_peft.unlearner import STATUS_EXIT_CODES

    assert rc == STATUS_EXIT_CODES[cons["status"]]  # the exit status follows the consolidation's result
    assert [c["request_id"] for c in cons["covers"]] == [a, b] and cons["warm_start"] is False and cons["rank"] == 8
    verify_files(led / "consolidated")  # an ordinary forget adapter
    assert L.status(led)["up_to_date"] and main(["ledger", "status", str(led)]) == 0
    capsys.readouterr()

    assert main(["ledger", "revoke", str(led), a]) == 0
    assert not (led / "requests" / a).exists()
    st = L.status(led)
    assert st["revoked_but_served"] == [a] and not st["up_to_date"]
    assert main(["ledger", "status", str(led)]) == 3 and f"revoked but still served: {a}" in capsys.readouterr().out
    # a revoked request's texts can no longer be trained into the served adapter
    with pytest.raises(InputError, match="not a sample of any active request"):
        L.match_texts(led, fg)
    from icu_peft import ICUConfig

    res = L.consolidate(led, ICUConfig(model=str(tiny_model_dir), progress=False, max_steps=8), fg[2:],
                        tiny_corpus["retain"], tiny_corpus["unseen"])
    cons = json.loads((led / "ledger.json").read_text())["consolidated"]
    # after a revocation the served weights still hold the revoked request: consolidation starts from zero
    assert [c["request_id"] for c in cons["covers"]] == [b] and cons["warm_start"] is False
    assert cons["restored_texts"] == 0  # a count for the audit trail, never the texts
    assert res.report["config"]["init_adapter"] is None
    # with requests only added since, it warm-starts from the served adapter
    assert main(["ledger", "add", str(led), str(tiny_forget_adapter_c)]) == 0
    res = L.consolidate(led, ICUConfig(model=str(tiny_model_dir), progress=False, max_steps=4),
                        fg[2:] + tiny_corpus["unseen"][:2], tiny_corpus["retain"], tiny_corpus["unseen"][2:])
    assert json.loads((led / "ledger.json").read_text())["consolidated"]["warm_start"] is True
    assert res.report["config"]["init_adapter"].endswith("consolidated")
    assert L.status(led)["up_to_date"]
    # `--from-zero` (warm=False): trained from zero although a warm start applies
    recipe.write_text("batch_size: 4\nretain_kl_samples: 12\nseed: 0\nmax_steps: 4\n")
    main(["ledger", "consolidate", str(led), "--model", str(tiny_model_dir),
          "--forget", _jsonl(data / "f2.jsonl", fg[2:] + tiny_corpus["unseen"][:2]),
          "--retain", _jsonl(data / "r2.jsonl", tiny_corpus["retain"]),
          "--unseen", _jsonl(data / "u2.jsonl", tiny_corpus["unseen"][2:]), "--no-progress", "--config", str(recipe),
          "--from-zero"])
    assert json.loads((led / "ledger.json").read_text())["consolidated"]["warm_start"] is False
    assert json.loads((led / "consolidated" / "forget_manifest.json").read_text())["config"]["init_adapter"] is None
    assert [h["op"] for h in json.loads((led / "ledger.json").read_text())["history"]] == [
        "add", "add", "consolidate", "revoke", "consolidate", "add", "consolidate", "consolidate"]


def test_warm_start_loads_the_adapter_and_refuses_another_layout(tiny_model_dir, tiny_forget_adapter):
    import torch
    from safetensors.torch import load_file

    from icu_peft.models import attach_lora, load_base_model
    from icu_peft.unlearner import warm_start

    model = attach_lora(load_base_model(str(tiny_model_dir), quantize=False))
    warm_start(model, tiny_forget_adapter)
    saved = load_file(str(tiny_forget_adapter / "adapter_model.safetensors"))
    key = next(k for k in saved if "lora_B" in k)
    own = dict(model.named_parameters())[key.replace(".weight", ".default.weight")]
    assert torch.equal(own.detach(), saved[key]) and saved[key].abs().sum() > 0
    other = attach_lora(load_base_model(str(tiny_model_dir), quantize=False), r=4)
    with pytest.raises(Exception):
        warm_start(other, tiny_forget_adapter)


def test_consolidation_holds_a_revoked_requests_texts_when_asked_and_refuses_an_active_ones(
        tiny_model_dir, tiny_corpus, tiny_forget_adapter, tiny_forget_adapter_b, tmp_path, monkeypatch):
    """`restore`: the texts that must come back join the retain anchors, ahead of the retain pool; a text
    of a request still active cannot be forgotten and restored at once."""
    import icu_peft.unlearner as U
    from icu_peft import ICUConfig
    from icu_peft import ledger as L
    from icu_peft.adapters import read_manifest

    led = tmp_path / "ledger"
    L.add_request(led, tiny_forget_adapter)
    L.add_request(led, tiny_forget_adapter_b)
    L.revoke_request(led, read_manifest(tiny_forget_adapter)["request_id"])
    fg, retain = tiny_corpus["forget"], tiny_corpus["retain"]
    seen = {}

    class Stop(Exception):
        pass

    def fake_forget(config, texts, retain_texts, unseen_texts, **kw):
        seen.update(texts=list(texts), retain=list(retain_texts))
        raise Stop

    monkeypatch.setattr(U, "forget", fake_forget)
    cfg = ICUConfig(model=str(tiny_model_dir), progress=False)
    with pytest.raises(InputError, match="to restore is a sample of active request"):
        L.consolidate(led, cfg, fg[2:], retain, tiny_corpus["unseen"], restore=[fg[0], fg[3]])
    assert not seen  # refused before any training
    with pytest.raises(Stop):
        L.consolidate(led, cfg, fg[2:], retain, tiny_corpus["unseen"], restore=fg[:2])
    assert seen["texts"] == fg[2:] and seen["retain"] == fg[:2] + list(retain)
