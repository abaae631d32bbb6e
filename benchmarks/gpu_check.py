"""The GPU check: one prepared script, sized for a few minutes of a lent GPU (room for a rerun in 15).

(a) **The whole CLI on CUDA** (forget x2, eval, verify, merge, revoke, combine, inspect) on a Llama of
    SmolLM2-135M's shape, trained from scratch in the script to memorise a few random records (its own
    small tokenizer; the model's vocabulary is SmolLM2's 49,152 rows). Exit code, seconds and peak
    CUDA memory of every command.
(b) **A Llama-3-8B-shaped model** with random weights, quantized to NF4 layer by layer as it is built
    (each linear layer's bf16 weights exist on the device only until they are packed: the bf16 model
    never exists in full), one forget request of 8 records with a fixed number of optimizer steps:
    peak CUDA memory, seconds per step, tokens per second, and `icu-peft plan`'s prediction beside
    them. The records are forgotten by force (min_epochs): random weights memorised nothing, and the
    memory and time of a step do not depend on it.

    # on the GPU (see the device README for carrying the bitsandbytes wheel)
    python benchmarks/gpu_check.py --workdir /tmp/gpu --out gpu_check.json
    # on CPU with tiny shapes (what tests/test_gpu_check.py runs)
    python benchmarks/gpu_check.py --small tiny --big tiny --workdir /tmp/gpu --out gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                      rope_theta=500000.0),
}


def _cuda():
    import torch

    return torch.cuda.is_available()


def _peak_reset():
    import torch

    if _cuda():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb():
    import torch

    if not _cuda():
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20)


def _write_jsonl(path: Path, texts) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def cli(argv) -> dict:
    """Run one icu-peft command in this process: exit code, seconds, peak CUDA memory, its last line."""
    from icu_peft.cli import main

    _peak_reset()
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    lines = (out.getvalue() + err.getvalue()).strip().splitlines()
    return {"command": str(argv[0]), "rc": rc, "seconds": round(time.time() - t0, 1), "peak_cuda_mb": _peak_mb(),
            "last_line": lines[-1][:200] if lines else "", "stdout": out.getvalue()}


def cli_round(shape: str, workdir: Path, plant_steps: int) -> dict:
    """(a): plant, then every lifecycle command once."""
    from icu_peft.adapters import read_manifest
    from icu_peft.testing import build_tiny_memorizer, random_sentences

    forget_t, retain_t, unseen_t = random_sentences(4, seed=1), random_sentences(12, seed=2), random_sentences(12, seed=3)
    model = workdir / f"model-{shape}"
    t0 = time.time()
    # a shape this wide trains from scratch at a lower rate than the tiny default
    lr = 3e-3 if shape == "tiny" else 1e-3
    planted = build_tiny_memorizer(model, forget_t + retain_t, unseen_t, steps=plant_steps, lr=lr,
                                   llama_shape=SHAPES[shape], device="cuda" if _cuda() else "cpu")
    row = {"shape": shape, "plant_s": round(time.time() - t0, 1), "plant_final_loss": planted["final_loss"]}
    f_a, f_b = _write_jsonl(workdir / "forget_a.jsonl", forget_t[:2]), _write_jsonl(workdir / "forget_b.jsonl", forget_t[2:])
    retain, unseen = _write_jsonl(workdir / "retain.jsonl", retain_t), _write_jsonl(workdir / "unseen.jsonl", unseen_t)
    a, b = workdir / "adapter_a", workdir / "adapter_b"
    steps = [
        cli(["forget", "--model", model, "--forget", f_a, "--retain", retain, "--unseen", unseen, "--out", a,
             "--no-progress", "--overwrite"]),
        cli(["forget", "--model", model, "--forget", f_b, "--retain", retain, "--unseen", unseen, "--out", b,
             "--no-progress", "--overwrite"]),
    ]
    steps.append(cli(["eval", "--model", model, "--adapter", a, "--data", f_a, "--metrics", "ma,el", "--json"]))
    steps.append(cli(["verify", "--model", model, "--adapter", a, "--forget", f_a,
                      "--unseen", unseen]))
    steps.append(cli(["merge", "--model", model, "--adapter", a, "--adapter", b, "--out", workdir / "merged",
                      "--overwrite"]))
    rid_b = read_manifest(b)["request_id"] if b.is_dir() else "missing"
    steps.append(cli(["revoke", "--model", workdir / "merged", "--adapter", rid_b, "--out", workdir / "revoked",
                      "--overwrite"]))
    steps.append(cli(["combine", "--adapter", a, "--adapter", b, "--out", workdir / "combined", "--overwrite"]))
    steps.append(cli(["inspect", workdir / "combined"]))
    for s in steps:
        s.pop("stdout")
    row["commands"] = steps
    # forget: 0 forgotten, 3 partial (honest, still a working run); verify: 0 or 1; the rest must succeed
    ok = {"forget": (0, 3), "verify": (0, 1)}
    row["ok"] = all(s["rc"] in ok.get(s["command"], (0,)) for s in steps)
    return row


def build_nf4_llama(shape: dict, device: str, dtype=None, seed: int = 0):
    """A random Llama of this shape whose decoder linears are NF4 from the start (QLoRA storage settings).

    Built on the meta device, then each linear layer in turn gets random bf16 weights on `device` that
    bitsandbytes packs at once; embeddings, norms and the head are materialised in `dtype`.
    """
    import bitsandbytes as bnb
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"vocab_size": 32000, **shape})
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    head = model.get_output_embeddings()
    std = cfg.initializer_range
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child is head:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            w = torch.randn(child.out_features, child.in_features, dtype=torch.bfloat16, device=device) * std
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4").to(device)
            del w
            setattr(parent, name, q)
    for name, p in list(model.named_parameters()):
        if p.device.type == "meta":
            value = (torch.ones(p.shape, dtype=dtype) if "norm" in name
                     else torch.randn(p.shape, dtype=dtype) * std)
            set_module_tensor_to_device(model, name, device, value=value)
    for name, b in list(model.named_buffers()):
        set_module_tensor_to_device(model, name, device, value=b.to(device))
    model.tie_weights()
    model.is_loaded_in_4bit = True  # what transformers' 4-bit loader sets; peft and icu-peft read it
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def big_request(shape_name: str, workdir: Path, steps: int) -> dict:
    """(b): the NF4 model built in place, one forget request, measured beside the planner."""
    import torch

    from icu_peft import ICUConfig
    from icu_peft.data import tokenize_texts
    from icu_peft.models import load_tokenizer
    from icu_peft.planner import plan_memory
    from icu_peft.testing import build_tokenizer, random_sentences
    from icu_peft.unlearner import forget

    device = "cuda" if _cuda() else "cpu"
    forget_t, retain_t = random_sentences(8, seed=11), random_sentences(16, seed=12)
    tok_dir = workdir / "tokenizer"
    build_tokenizer(forget_t + retain_t, tok_dir)
    tok = load_tokenizer(str(tok_dir))
    _peak_reset()
    t0 = time.time()
    model = build_nf4_llama(SHAPES[shape_name], device)
    build_s = time.time() - t0
    built_mb = _peak_mb()
    cfg = ICUConfig(progress=False, seed=0, min_epochs=steps, max_steps=steps, ma_threshold=0.5, el_threshold=0.05,
                    el_start=40, precision_check="off")
    seq_len = max(len(x) for x in tokenize_texts(forget_t + retain_t, tok, cfg.max_length, "00").input_ids)
    plan = plan_memory(model.config, cfg, device, seq_len=seq_len, forget_samples=len(forget_t),
                       retain_samples=len(retain_t), runtime=0.0 if device == "cuda" else None)
    _peak_reset()
    t1 = time.time()
    result = forget(cfg, forget_t, retain_t, None, base_model=model, tokenizer=tok)
    wall = time.time() - t1
    rep = result.report
    n_steps = rep["steps"] or 1
    return {"shape": shape_name, "device": device, "parameters": plan.setting["parameters"], "build_s": round(build_s, 1),
            "built_peak_cuda_mb": built_mb, "steps": rep["steps"], "request_s": round(wall, 1),
            "seconds_per_step_incl_scoring": round(wall / n_steps, 2),
            "tokens_per_s_incl_scoring": round(n_steps * plan.setting["tokens_per_step"] / wall, 1),
            "peak_cuda_mb": _peak_mb(), "peak_rss_mb": rep.get("peak_rss_mb"),
            "planned_peak_mb": round(plan.peak_bytes / 2**20),
            "planned_parts_mb": {k: round(v / 2**20) for k, v in plan.parts.items()},
            "seq_len": seq_len, "status": rep["status"],
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON results")
    p.add_argument("--small", default="smollm2-135m", choices=sorted(SHAPES), help="shape for the CLI round")
    p.add_argument("--big", default="llama3-8b", choices=sorted(SHAPES), help="shape for the NF4 request")
    p.add_argument("--plant-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps of the big request")
    p.add_argument("--skip", default="", help="comma list: cli, big")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    import torch

    from icu_peft import __version__

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "icu_peft": __version__, "torch": torch.__version__,
           "cuda": _cuda(), "argv": sys.argv[1:] if argv is None else list(argv)}
    skip = set(filter(None, args.skip.split(",")))
    failed = False
    for part, fn in (("cli", lambda: cli_round(args.small, args.workdir, args.plant_steps)),
                     ("big", lambda: big_request(args.big, args.workdir, args.steps))):
        if part in skip:
            continue
        t0 = time.time()
        try:
            out[part] = fn()
        except Exception as e:  # record and go on: one failed part must not hide the other's figures
            import traceback

            out[part] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            failed = True
        out[part]["part_s"] = round(time.time() - t0, 1)
        args.out.write_text(json.dumps(out, indent=2))
        print(json.dumps({part: {k: v for k, v in out[part].items() if k != "traceback"}}), flush=True)
    failed = failed or not out.get("cli", {}).get("ok", True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
