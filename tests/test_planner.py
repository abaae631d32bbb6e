"""The memory planner: its parts against the loaded model, its peak against a measured one, the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import quick_config

ROOT = Path(__file__).resolve().parents[1]


def _storage_bytes(model) -> int:
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:  # the block statistics of a 4-bit weight (absmax, and its own scale when nested)
            total += qs.absmax.numel() * qs.absmax.element_size()
            if getattr(qs, "state2", None) is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total


@pytest.mark.parametrize("quantize", [True, False], ids=["nf4", "fp32"])
def test_base_and_lora_parts_match_the_loaded_model(tiny_model_dir, quantize):
    from icu_peft.models import attach_lora, load_base_model
    from icu_peft.planner import ADAM_BYTES_PER_TRAINABLE, load_model_config, plan_memory

    cfg = quick_config(tiny_model_dir, quantize=quantize, precision_check="off")
    plan = plan_memory(load_model_config(str(tiny_model_dir)), cfg, "cpu", seq_len=16, runtime=0.0)
    base = load_base_model(str(tiny_model_dir), quantize=quantize)
    assert plan.parts["base"] == pytest.approx(_storage_bytes(base), rel=0.02)
    model = attach_lora(base, cfg.lora_r, cfg.lora_alpha, target_modules=cfg.target_modules)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.parts["trainable"] == trainable * ADAM_BYTES_PER_TRAINABLE
    assert plan.parts["precision_view"] == 0


def test_precision_view_and_lora_layers_change_the_plan(tiny_model_dir):
    from icu_peft.planner import load_model_config, plan_memory

    mc = load_model_config(str(tiny_model_dir))
    kw = dict(seq_len=32, runtime=0.0)
    plain = plan_memory(mc, quick_config(tiny_model_dir, precision_check="off"), "cpu", **kw)
    view = plan_memory(mc, quick_config(tiny_model_dir, precision_check="on"), "cpu", **kw)
    top = plan_memory(mc, quick_config(tiny_model_dir, precision_check="off", lora_layers=1), "cpu", **kw)
    assert view.parts["precision_view"] > plain.parts["base"]  # a full-precision copy is larger than NF4
    assert top.parts["trainable"] == pytest.approx(plain.parts["trainable"] / 2)  # 1 of 2 layers
    assert top.parts["step"] < plain.parts["step"]  # the gradient stops at the lowest trained layer
    # not enough memory: 'auto' leaves the view out, as the loop would, and the plan says it does not fit
    small = plan_memory(mc, quick_config(tiny_model_dir), "cpu", device_memory=view.parts["precision_view"], **kw)
    assert small.fits is False and small.parts["precision_view"] == 0


def test_bf16_products_add_the_casts_autograd_keeps_for_each_trained_layer(tiny_model_dir):
    """train_dtype bfloat16: every frozen linear weight of each layer the gradient crosses is cast per call and
    saved for backward (2 bytes a weight); with checkpointing one layer's at a time; float32: none."""
    from icu_peft.planner import _linears, load_model_config, meta_model, plan_memory

    mc = load_model_config(str(tiny_model_dir))
    kw = dict(seq_len=32, runtime=0.0)
    layer_weights = sum(m.weight.numel() for n, m in _linears(meta_model(mc)) if ".layers.1." in n)

    def step(**c):
        return plan_memory(mc, quick_config(tiny_model_dir, precision_check="off", **c), "cpu", **kw).parts["step"]

    fp32 = step(train_dtype="float32")
    assert step(train_dtype="bfloat16") - fp32 == pytest.approx(2 * 2 * layer_weights)  # 2 layers, 2 bytes
    assert step(train_dtype="bfloat16", lora_layers=1) - step(train_dtype="float32", lora_layers=1) == pytest.approx(
        2 * layer_weights)
    ckpt = step(train_dtype="bfloat16", gradient_checkpointing=True) - step(train_dtype="float32", gradient_checkpointing=True)
    assert ckpt == pytest.approx(2 * layer_weights)


def test_activation_probe_grows_with_width_and_length():
    from transformers import LlamaConfig

    from icu_peft.planner import activation_probe

    narrow = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1000)
    wide = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=1000)
    a, b = activation_probe(narrow), activation_probe(wide)
    # what autograd keeps is a few hidden and intermediate vectors per token: linear in the width
    assert 1.6 < b.bytes(100, 64) / a.bytes(100, 64) < 2.4
    assert a.bytes(100, 64) > 10 * 64 * 4  # at least the layer's input, q, k, v, output... in fp32
    assert a.bytes(200, 64) == pytest.approx(2 * a.bytes(100, 64))


def test_predicted_peak_is_near_the_measured_one(tmp_path):
    """A ~20M-weight Llama, one forget request in a fresh process: measured anonymous memory vs the plan."""
    from icu_peft.testing import build_tiny_memorizer

    model = tmp_path / "m"
    build_tiny_memorizer(model, ["record 1: amber basalt cobalt"], steps=1,
                         llama_shape=dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                          num_attention_heads=6, num_key_value_heads=2, vocab_size=16000))
    job = dict(size="test", mode="lora", model=str(model), steps=2, threads=2, precision_check="on", forget=4, retain=8)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_check.py"), "--workdir", str(tmp_path),
                           "--job", json.dumps(job)], capture_output=True, text=True, timeout=600)
    rows = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    assert rows, proc.stderr[-2000:]
    row = rows[0]
    assert row["steps"] == 2 and row["precision_view"]
    assert 0.75 < row["ratio"] < 1.33, row


def test_plan_cli(tiny_model_dir, capsys):
    from icu_peft.cli import main

    rc = main(["plan", "--model", str(tiny_model_dir), "--seq-len", "32", "--tokens-per-second", "100", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["peak_bytes"] > 0 and out["predicted_seconds"] > 0
    parts = out["parts"]
    run = (sum(v for k, v in parts.items() if k not in ("step", "heap_steps", "scoring", "load"))
           + max(parts["step"] + parts["heap_steps"], parts["scoring"]))
    assert out["peak_bytes"] == pytest.approx(max(run, parts.get("load", 0)))
    assert parts["load"] > parts["base"]  # a local directory: its weight files are mapped while a 4-bit load packs them
    assert out["setting"]["step_budget_max"] == 4 * out["setting"]["step_budget"]  # max_steps auto may grow 4x
    rc = main(["plan", "--model", str(tiny_model_dir), "--seq-len", "32", "--tokens-per-second", "100"])
    text = capsys.readouterr().out
    assert rc == 0 and f"grows to {4 * out['setting']['step_budget']} steps" in text, text
    rc = main(["plan", "--model", str(tiny_model_dir), "--device-memory", "0.001"])
    assert rc == 1 and "fits: no" in capsys.readouterr().out
    rc = main(["plan", "--model", str(tiny_model_dir), "--full-ft", "--device-memory", "64"])
    assert rc == 0
    rc = main(["plan", "--model", str(tiny_model_dir / "missing")])
    assert rc == 2
    rc = main(["plan", "--model", str(tiny_model_dir), "--seq-len", "0"])
    assert rc == 2


def test_gpu_check_runs_end_to_end_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "tiny", "--big", "tiny",
                           "--workdir", str(tmp_path), "--out", str(out), "--plant-steps", "300"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert [c["command"] for c in res["cli"]["commands"]] == ["forget", "forget", "eval", "verify", "merge", "revoke",
                                                             "combine", "inspect"]
    assert res["cli"]["ok"]
    big = res["big"]
    assert big["steps"] == 4 and big["planned_peak_mb"] > 0 and big["tokens_per_s_incl_scoring"] > 0
    assert torch.cuda.is_available() or big["peak_cuda_mb"] is None


def test_heap_steps_count_one_more_step_where_the_steps_take_the_heap(tiny_model_dir):
    """cpu_heap_steps: the heap keeps about one step's freed blocks at the step's peak (allocator.HeapSteps);
    'auto' takes it only where the memory beside the static parts holds HEAP_AUTO_MARGIN steps."""
    from icu_peft.allocator import HEAP_AUTO_MARGIN
    from icu_peft.planner import load_model_config, plan_memory

    mc = load_model_config(str(tiny_model_dir))
    kw = dict(seq_len=32, runtime=0.0)

    def plan(setting, device="cpu", **k):
        return plan_memory(mc, quick_config(tiny_model_dir, precision_check="off", cpu_heap_steps=setting), device,
                           **kw, **k)

    off, on, auto = plan(False), plan(True), plan("auto")
    assert off.parts["heap_steps"] == 0 and on.parts["heap_steps"] == on.parts["step"] > 0
    assert on.peak_bytes == pytest.approx(off.peak_bytes + on.parts["step"])  # the step outweighs scoring here
    assert auto.parts["heap_steps"] == on.parts["step"]  # no device size: counted
    static = sum(v for k, v in off.parts.items() if k not in ("step", "heap_steps", "scoring", "load"))
    step = off.parts["step"]
    assert plan("auto", device_memory=static + HEAP_AUTO_MARGIN * step * 1.01).parts["heap_steps"] == step
    assert plan("auto", device_memory=static + HEAP_AUTO_MARGIN * step * 0.99).parts["heap_steps"] == 0
    assert plan(True, device="cuda").parts["heap_steps"] == 0  # the activations live on the device
    one = plan_memory(mc, quick_config(tiny_model_dir, precision_check="off", cpu_heap_steps="auto", max_steps=1),
                      "cpu", **kw)
    assert one.parts["heap_steps"] == 0  # 'auto' measures the first step outside the heap: one step never takes it
