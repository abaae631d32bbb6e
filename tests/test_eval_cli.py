"""`icu-peft eval` against an independent computation, its errors, the relearning probe and lm-eval."""

from __future__ import annotations

import json
import math

import pytest
import torch

from icu_peft.cli import main


def run_json(capsys, *argv):
    capsys.readouterr()
    assert main(["eval", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------------------ independent computation

@torch.no_grad()
def independent_scores(model, tok, texts, n=10, start=1):
    """MA, EL_n and perplexity with nothing from icu_peft: plain forward passes and, for EL, one
    unbatched greedy roll-out per prefix on transformers' own KV cache."""
    ma, el, nll, count = [], [], 0.0, 0
    for text in texts:
        x = torch.tensor(tok(text)["input_ids"])
        T = len(x)
        out = model(input_ids=x[None], labels=x[None])
        ma.append(float((out.logits[0, :-1].argmax(-1) == x[1:]).float().mean()))
        nll += float(out.loss) * (T - 1)
        count += T - 1
        overlaps = []
        for t in range(start, T - n + 1):
            step = model(input_ids=x[None, :t], use_cache=True)
            gen = [int(step.logits[0, -1].argmax())]
            while len(gen) < T - t:
                step = model(input_ids=torch.tensor([[gen[-1]]]), past_key_values=step.past_key_values, use_cache=True)
                gen.append(int(step.logits[0, -1].argmax()))
            ref = {tuple(x[t:].tolist()[i:i + n]) for i in range(T - t - n + 1)}
            grams = [tuple(gen[i:i + n]) for i in range(len(gen) - n + 1)]
            overlaps.append(sum(g in ref for g in grams) / len(grams))
        el.append(sum(overlaps) / len(overlaps))
    return ma, el, math.exp(nll / count)


def test_eval_json_agrees_with_an_independent_computation(capsys, tiny_model_dir, tiny_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [tiny_corpus["forget"][0], tiny_corpus["unseen"][0]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # --el-start 20 (ICU's tail variant) keeps the no-cache-sharing reference affordable
    got = run_json(capsys, "--model", tiny_model_dir, "--no-quantize", "--data", data, "--el-start", 20,
                   "--metrics", "ma,el,ppl")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ma, el, ppl = independent_scores(model, tok, texts, start=20)
    assert got["count"] == 2 and got["metrics"] == ["ma", "el", "ppl"]
    assert [s["ma"] for s in got["samples"]] == pytest.approx(ma, abs=1e-6)
    assert [s["el"] for s in got["samples"]] == pytest.approx(el, abs=1e-6)
    assert got["ma"] == pytest.approx(sum(ma) / 2, abs=1e-6)
    assert got["el"] == pytest.approx(sum(el) / 2, abs=1e-6)
    assert got["ppl"] == pytest.approx(ppl, rel=1e-5)
    # the memorised half and the unseen half really differ: the comparison above is not vacuous
    assert ma[0] > 0.9 > ma[1] and el[0] > 0.5 > el[1]


def test_eval_with_adapter_agrees_with_peft(capsys, tiny_model_dir, tiny_corpus, tiny_forget_adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = tiny_corpus["forget"][:2]
    data = tmp_path / "f.txt"
    data.write_text("\n".join(texts) + "\n")
    got = run_json(capsys, "--model", tiny_model_dir, "--no-quantize", "--adapter", tiny_forget_adapter,
                   "--data", data, "--metrics", "ma,ppl")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(tiny_forget_adapter)).eval()
    with torch.no_grad():
        ma, nll, count = [], 0.0, 0
        for t in texts:
            x = torch.tensor(tok(t)["input_ids"])
            out = model(input_ids=x[None], labels=x[None])
            ma.append(float((out.logits[0, :-1].argmax(-1) == x[1:]).float().mean()))
            nll, count = nll + float(out.loss) * (len(x) - 1), count + len(x) - 1
    assert [s["ma"] for s in got["samples"]] == pytest.approx(ma, abs=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert "el" not in got
    # one adapter: samples carry the ids of its manifest
    manifest = json.loads((tiny_forget_adapter / "forget_manifest.json").read_text())
    assert [s["id"] for s in got["samples"]] == [s["id"] for s in manifest["samples"]]


def test_eval_extraction_and_mia(capsys, tiny_model_dir, tiny_files, tiny_corpus, tmp_path):
    secrets = tmp_path / "s.jsonl"
    rows = [{"prefix": " ".join(t.split()[:5]), "secret": " " + " ".join(t.split()[5:])}
            for t in tiny_corpus["forget"][:2] + tiny_corpus["unseen"][:2]]
    secrets.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = run_json(capsys, "--model", tiny_model_dir, "--no-quantize", "--data", tiny_files["forget"], "--unseen",
                   tiny_files["unseen"], "--secrets", secrets, "--metrics", "extraction,mia,bleu")
    assert got["extraction"] == 0.5
    assert [s["extracted"] for s in got["secrets"]] == [1.0, 1.0, 0.0, 0.0]
    assert got["mia"]["loss"]["auc"] > 0.9 and set(got["mia"]) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    assert 0 <= got["bleu"] <= 1 and all("mia_loss" in s and "bleu" in s for s in got["samples"])
    out = json.dumps(got)
    for t in tiny_corpus["forget"] + tiny_corpus["unseen"]:
        assert " ".join(t.split()[2:6]) not in out  # no text in the output


def test_eval_table_output(capsys, tiny_model_dir, tiny_files):
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--no-quantize", "--data", str(tiny_files["forget"]),
                 "--metrics", "ma,ppl"]) == 0
    out = capsys.readouterr().out
    assert "MA " in out and "PPL " in out and out.count("\n") >= 6


@pytest.mark.parametrize("extra,needle", [
    (["--metrics", "ma,bogus"], "unknown metric"),
    (["--metrics", "mia"], "--unseen"),
    (["--metrics", "extraction"], "--secrets"),
    (["--data", "/nonexistent/x.jsonl"], "not found"),
    (["--el-n", "0"], "el_n"),
])
def test_eval_bad_input_is_one_line_and_exit_2(capsys, tiny_files, extra, needle):
    argv = ["eval", "--model", "/nonexistent-model", "--data", str(tiny_files["forget"])] + extra
    capsys.readouterr()
    assert main(argv) == 2  # the input is checked before the (missing) model is loaded
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_eval_bad_secrets_file(capsys, tiny_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prefix": "a"}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--model", "/nonexistent-model", "--data", str(tiny_files["forget"]), "--secrets", str(bad),
                 "--metrics", "extraction"]) == 2
    assert "'prefix' and 'secret'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ relearning probe

def test_relearn_probe_leaves_the_model_unchanged(tiny_model_dir, tiny_corpus, tiny_forget_adapter):
    from icu_peft.adapters import load_forget_adapters
    from icu_peft.evaluation import EvalConfig, relearn_probe
    from icu_peft.metrics import teacher_forced
    from icu_peft.models import load_base_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_forget_adapters(load_base_model(str(tiny_model_dir), quantize=False), [tiny_forget_adapter])
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["forget"]]
    before = teacher_forced(model, seqs, tok.pad_token_id).target_logprobs
    active = list(model.active_adapters)
    # scoring EL on the tail only keeps the test fast; the probe is the same
    cfg = EvalConfig(relearn_steps=3, relearn_lr=5e-3, relearn_batch_size=1, el_n=4, el_start=30)
    res = relearn_probe(model, tok, tiny_corpus["forget"][:2], tiny_corpus["unseen"][:2], cfg)
    after = teacher_forced(model, seqs, tok.pad_token_id).target_logprobs
    assert torch.equal(before, after)
    assert list(model.active_adapters) == active and "icu_relearn" not in model.peft_config
    assert not any(p.requires_grad for p in model.parameters())
    assert res["train_count"] == 1 and res["held_out_count"] == 1 and res["control_count"] == 2
    for part in ("before", "after", "original"):
        assert 0 <= res["held_out"][part]["ma"] <= 1
    # the adapter-free level is the memorised one; the adapter took it down
    assert res["held_out"]["original"]["ma"] > res["held_out"]["before"]["ma"]
    assert set(res["recovery"]) == {"ma", "el"} and set(res["gain_over_control"]) == {"ma", "el"}
    assert res["train_loss"]["last"] < res["train_loss"]["first"]  # the throwaway LoRA did learn


def test_relearn_probe_with_zero_steps_changes_nothing(tiny_model_dir, tiny_corpus):
    from icu_peft.evaluation import EvalConfig, relearn_probe
    from icu_peft.models import load_base_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), quantize=False)
    res = relearn_probe(model, tok, tiny_corpus["forget"][:3], None, EvalConfig(relearn_steps=0, el_n=4))
    assert res["held_out"]["after"] == res["held_out"]["before"]
    assert "recovery" not in res and res["control"] is None
    assert not hasattr(model, "peft_config")  # the throwaway LoRA was unloaded


def test_relearn_needs_two_samples(tiny_model_dir, tiny_corpus):
    from icu_peft.errors import InputError
    from icu_peft.evaluation import EvalConfig, relearn_probe

    with pytest.raises(InputError):
        relearn_probe(None, None, tiny_corpus["forget"][:1], None, EvalConfig(relearn_steps=1))


# ------------------------------------------------------------------------------ lm-eval harness

def test_lm_eval_on_a_local_task(capsys, tiny_model_dir, tiny_corpus, tiny_files, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "mc.jsonl"
    rows = []
    for t in tiny_corpus["forget"]:  # memorised continuation vs an implausible one: accuracy 1
        w = t.split(" ")
        rows.append({"question": " ".join(w[:5]), "choices": [" " + " ".join(w[5:8]), " zinnia zinnia zinnia"],
                     "label": 0})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(f"""task: icu_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    got = run_json(capsys, "--model", tiny_model_dir, "--no-quantize", "--data", tiny_files["forget"], "--metrics",
                   "ma", "--tasks", "icu_tiny_mc", "--tasks-include", tmp_path / "tasks")
    assert got["lm_eval"]["icu_tiny_mc"]["acc,none"] == 1.0
    assert main(["eval", "--model", str(tiny_model_dir), "--no-quantize", "--data", str(tiny_files["forget"]),
                 "--metrics", "ma", "--tasks", "no_such_task_xyz", "--tasks-include", str(tmp_path / "tasks")]) == 2
