"""The unlearning benchmark: icu-peft against full-fine-tuning ICU, GA, GradDiff, NPO and the oracle.

    python benchmarks/unlearning.py --scenario A [--methods icu,icu-paper,...] [--out FILE] [--cache-dir DIR]
    python benchmarks/unlearning.py --scenario A --markdown          # tables from the saved JSON

Scenarios (each on SmolLM2-135M-Instruct planted by full fine-tuning; every method starts from the
same planted weights, cached by `icu_peft.demo.plant`):
  A  the demo's fictitious customer records (icu_peft.demo.records); 10% of the people are forgotten,
     the others are the retain set, people never planted are the unseen level.
  B  ICU's own forget sets (../shared/data/tdec/lm_extraction_32_*.csv), truncated to --b-tokens
     tokens: one file's samples are forgotten, another's are retained (both planted), a third's are
     the unseen level. Skipped with a message when ../shared is missing.

Every method runs in a fresh subprocess (`--worker`), one after the other, so its peak RSS
(ru_maxrss) is its own and wall times are measured side by side on the same machine state. Each
finished row is written to the results JSON at once; `--resume` skips rows already there. The
JSON holds numbers, settings and salted-hash-free counts only: no sample text.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"

# name -> (preset of ICUConfig.for_method, overrides, quantized 4-bit base?)
METHODS: Dict[str, tuple] = {
    # the demo's settings for records (icu_peft.demo.run.demo_icu_config): last-10-layer LoRA, batch 1,
    # u=2 a=1 b=3, forget term on tokens not shared with the retain set, lr 3e-3, and forget samples held at
    # the unseen loss level (nll_target)
    "icu": ("icu", dict(learning_rate=3e-3, forget_weight=2.0, learn_weight=1.0, kl_weight=3.0,
                        forget_distinct_ngram=4, lora_layers=10, nll_target="unseen"), True),
    # the same on an unquantized base: on a CPU, bitsandbytes' 4-bit matmuls dequantize every weight
    # on every call, so this row shows the speed the 4-bit base costs there
    "icu-fp32": ("icu", dict(learning_rate=3e-3, forget_weight=2.0, learn_weight=1.0, kl_weight=3.0,
                             forget_distinct_ngram=4, lora_layers=10, quantize=False), False),
    # the library defaults and nothing else (issue "Calibrated forgetting": what a user gets with no flags)
    "icu-defaults": ("icu", {}, True),
    "icu-paper": ("icu_paper", {}, True),
    "icu-full": ("icu_paper", {"use_lora": False, "quantize": False}, False),
    "ga": ("ga", {}, True),
    "graddiff": ("graddiff", {}, True),
    "npo": ("npo", {}, True),
}
ROW_ORDER = ["before-4bit", "before-fp32", "icu", "icu-defaults", "icu-fp32", "icu-paper", "icu-full", "ga", "graddiff", "npo", "oracle"]
LABELS = {
    "before-4bit": "planted model, 4-bit (before)",
    "before-fp32": "planted model, fp32 (before)",
    "icu": "**icu-peft** (method icu, record settings: LoRA r=8 in the last 10 layers, 4-bit base)",
    "icu-defaults": "**icu-peft defaults** (no flags: method icu, lr auto, 400-step budget, 4-bit base)",
    "icu-fp32": "icu-peft settings on an fp32 base (no quantization)",
    "icu-paper": "ICU objective of the paper's code, LoRA r=8, 4-bit base",
    "icu-full": "ICU, full fine-tuning, fp32 (the published algorithm)",
    "ga": "gradient ascent (Jang et al. KUMPR), LoRA 4-bit",
    "graddiff": "GradDiff (GA + retain NLL), LoRA 4-bit",
    "npo": "NPO (+ retain NLL), LoRA 4-bit",
    "oracle": "oracle: planted without the forget set, 4-bit",
}
DEFAULT_METHODS = ["icu", "icu-fp32", "icu-paper", "icu-full", "ga", "graddiff", "npo", "oracle"]


def plant_settings(args):
    """Pinned planting settings, so the cache key (and the planted weights) do not follow demo defaults."""
    from icu_peft.demo.plant import PlantSettings

    if args.scenario == "B":
        # the demo's faster planting (top 10 of 30 layers, lr 1e-3): B plants 2 x 32 samples, and full
        # fine-tuning of every layer took ~3.5 min an epoch on the shared 2 cores
        return PlantSettings(learning_rate=1e-3, warmup_steps=5, batch_size=4, max_epochs=args.plant_max_epochs,
                             min_epochs=6, check_every=3, extra_epochs=2, freeze_embeddings=True,
                             train_top_layers=10, seed=0)
    return PlantSettings(learning_rate=5e-4, warmup_steps=5, batch_size=4, max_epochs=args.plant_max_epochs,
                         min_epochs=4, check_every=2, extra_epochs=2, freeze_embeddings=True, seed=0)


# ------------------------------------------------------------------------------ scenarios

def _tdec(name: str) -> List[str]:
    csv.field_size_limit(1 << 30)
    with open(SHARED / "tdec" / f"lm_extraction_{name}.csv", newline="", encoding="utf-8") as f:
        return [r["text"] for r in csv.DictReader(f)]


def _suffix_probes(texts, tokenizer, prefix_tokens: int, secret_tokens: int):
    """Scenario B's extraction test: the first tokens of a sample -> its next `secret_tokens` tokens verbatim."""
    from icu_peft.demo.records import Probe

    out = []
    for i, t in enumerate(texts):
        ids = tokenizer(t)["input_ids"]
        prefix = tokenizer.decode(ids[:prefix_tokens])
        secret = tokenizer.decode(ids[prefix_tokens:prefix_tokens + secret_tokens]).strip()
        if secret:
            out.append(Probe(person=i, field="suffix", prefix=prefix, secret=secret))
    return out


def build_scenario(args, tokenizer=None) -> dict:
    """Texts and probes of one scenario; deterministic, so every worker rebuilds the same thing."""
    from icu_peft.demo.run import general_text_source, general_texts

    general = general_texts(args.general_texts)
    if args.scenario == "A":
        from icu_peft.demo.records import make_corpus

        c = make_corpus(num_people=args.people, num_unseen=args.unseen, forget_fraction=0.1, seed=args.seed)
        return dict(name="A", forget=c.forget_texts, retain=c.retain_texts, unseen=c.unseen_texts,
                    probes_forget=c.probes(c.forget_people), probes_retain=c.probes(c.kept_people),
                    probes_unseen=c.probes(list(c.unseen)), plant=c.texts, oracle=c.retain_texts,
                    general=general, general_source=general_text_source(), max_length=128, el_start=1,
                    sizes=dict(people=args.people, forgotten=len(c.forget_texts), kept=len(c.retain_texts),
                               unseen=len(c.unseen_texts)))
    if tokenizer is None:
        from icu_peft.demo.smollm2 import find_smollm2
        from transformers import AutoTokenizer

        folder, gguf = find_smollm2()
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)

    def cut(texts, n):
        return [tokenizer.decode(tokenizer(t)["input_ids"][:args.b_tokens]) for t in texts[:n]]

    forget = cut(_tdec(args.b_forget_set), args.b_samples)
    retain = cut(_tdec(args.b_retain_set), args.b_samples)
    unseen = cut(_tdec(args.b_unseen_set), args.b_samples)
    half = args.b_tokens // 2
    pf, pr, pu = (_suffix_probes(x, tokenizer, half, 8) for x in (forget, retain, unseen))
    return dict(name="B", forget=forget, retain=retain, unseen=unseen, probes_forget=pf, probes_retain=pr,
                probes_unseen=pu, plant=forget + retain, oracle=retain, general=general,
                general_source=general_text_source(), max_length=args.b_tokens + 8, el_start=b_el_start(args),
                sizes=dict(forgotten=len(forget), kept=len(retain), unseen=len(unseen), tokens=args.b_tokens,
                           el_start=b_el_start(args),
                           forget_set=args.b_forget_set, retain_set=args.b_retain_set, unseen_set=args.b_unseen_set))


def b_el_start(args) -> int:
    """B scores EL10 on prefixes from the middle of each sample on, as ICU's code does (t >= 150 of 200):
    on 32 never-seen samples every position's greedy roll-out took tens of minutes on 2 CPU cores."""
    return args.b_el_start if args.b_el_start else args.b_tokens // 2


def planted_dirs(args, sc) -> tuple:
    from icu_peft.demo.plant import planted_dir

    root = Path(args.cache_dir) if args.cache_dir else None
    s = plant_settings(args)
    return planted_dir(sc["plant"], s, root), planted_dir(sc["oracle"], s, root)


# ------------------------------------------------------------------------------ measuring

def measure(model, tok, sc, el_n: int = 10, unseen: bool = True) -> dict:
    """Forget / retain (/ unseen) MA, EL10 (mean, max), secrets; general perplexity; MIA forget vs unseen.

    The unseen level (EL10 on text the model never saw: many greedy roll-outs) is measured on the
    untouched models only; a forget run measures it itself, on its own base, for its thresholds.
    """
    import torch

    from icu_peft.demo.run import measure_group, perplexity
    from icu_peft.mia import membership_inference, zlib_sizes_of

    es = sc["el_start"]
    out = {"forget": measure_group(model, tok, sc["forget"], sc["probes_forget"], el_n, el_start=es),
           # retain: MA and secrets (the figures); EL10 of drifting retain text would cost minutes
           "retain": measure_group(model, tok, sc["retain"], sc["probes_retain"], el_n, el=False),
           "perplexity": perplexity(model, tok, sc["general"])}
    enc = lambda texts: [torch.tensor(tok(t)["input_ids"][:sc["max_length"]], dtype=torch.long) for t in texts]  # noqa: E731
    f, u = enc(sc["forget"]), enc(sc["unseen"])
    mia = membership_inference(model, f, u, tok.pad_token_id, zlib_sizes_of(tok, f), zlib_sizes_of(tok, u))
    out["mia_auc"] = {k: v["auc"] for k, v in mia.items()}
    if unseen:
        out["unseen"] = measure_group(model, tok, sc["unseen"], sc["probes_unseen"], el_n, el_start=es)
    return out


def peak() -> dict:
    import torch

    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def dir_bytes(path: Path) -> dict:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return {"bytes_written": sum(p.stat().st_size for p in files),
            "weights_bytes": sum(p.stat().st_size for p in files if p.suffix == ".safetensors")}


def worker(job: dict) -> dict:
    """One row, in its own process: load, (forget), measure. Returns the row."""
    import torch

    from icu_peft.config import ICUConfig
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.unlearner import forget

    torch.manual_seed(0)
    args = argparse.Namespace(**job["args"])
    tok = load_tokenizer(job["model_dir"])
    sc = build_scenario(args, tok)
    t0 = time.time()
    model = load_base_model(job["model_dir"], quantize=job["quantize"])
    row = {"load_s": round(time.time() - t0, 1)}
    params = sum(p.numel() for p in model.parameters())
    row["base_bf16_bytes"] = int(params) * 2 if not job["quantize"] else None
    if job.get("method"):
        preset, over, _ = METHODS[job["method"]]
        kw = dict(learning_rate=args.lr, max_epochs=args.max_epochs, batch_size=args.batch_size, seed=0, progress=False, el_n=10,
                  max_length=sc["max_length"], el_start=sc["el_start"])
        if job["method"] == "icu-defaults":
            # what a user gets with no flags: the rate, the batch and the budget are the library's (auto), not
            # the shared --lr / --batch-size / --max-epochs the baselines run with; only the data's shape is set,
            # and the model's path, from which a request loads its full-precision view (precision_check auto)
            kw = dict(seed=0, progress=False, max_length=sc["max_length"], el_start=sc["el_start"],
                      model=job["model_dir"])
        if not over.get("use_lora", True):
            kw.update(learning_rate=args.full_lr)
        kw.update(over)  # a method's own settings (e.g. icu's learning rate) win over the shared --lr
        kw.update(job.get("overrides") or {})
        kw.update(dict(getattr(args, "set", None) or []))  # --set, parsed in main
        if job.get("thresholds"):
            kw.update(ma_threshold=job["thresholds"]["ma"], el_threshold=job["thresholds"]["el"])
        cfg = ICUConfig.for_method(preset, **kw)
        tmp = Path(tempfile.mkdtemp(prefix="icu-bench-"))
        try:
            t1 = time.time()
            # The unseen level was measured once on this very base (row before-4bit / before-fp32): passing
            # it as thresholds spares every method the same minutes of EL10 roll-outs on unseen text. The
            # unseen texts still go in: for the report's MIA and for nll_target (one forward pass each).
            res = forget(cfg, sc["forget"], sc["retain"], sc["unseen"], output_dir=tmp / "out", base_model=model,
                         tokenizer=tok)
            row["wall_s"] = round(time.time() - t1, 1)
            row.update(peak())  # the forget request's peak: load + train + save, before measuring
            row.update(dir_bytes(tmp / "out"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rep = res.report
        model = res.model
        row.update(status=rep["status"], epochs=rep["epochs"], steps=rep["steps"],
                   forgotten_samples=rep["forget"]["forgotten"], thresholds=rep["thresholds"],
                   config={k: v for k, v in cfg.to_dict().items() if k not in ("hash_salt", "model", "request_id")},
                   trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))
        if hasattr(model, "get_base_model"):
            base = model.get_base_model()
            n_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
            row["base_params"] = sum(p.numel() for p in base.parameters()) - n_lora
    else:
        row.update(peak())
    model.eval()
    t2 = time.time()
    row["measure"] = measure(model, tok, sc, unseen=not job.get("method"))
    row["measure_s"] = round(time.time() - t2, 1)
    return row


def _worker_env(args: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.get("threads"):
        # on a CPU shared with other jobs, one thread per process wastes far less time in OpenMP barriers
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args["threads"])
    return env


def run_worker(job: dict, log: Path) -> dict:
    """Run `job` in a fresh interpreter; its stdout's last line is the row as JSON."""
    env = _worker_env(job["args"])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
    with open(log, "a") as lf:
        lf.write(f"\n=== {job.get('method') or job['row']} {time.strftime('%H:%M:%S')}\n")
        lf.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=lf, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"{job.get('method') or job['row']} failed (exit {p.returncode}); see {log}")
    return json.loads(lines[-1][4:])


# ------------------------------------------------------------------------------ planting

def ensure_planted(args, sc, which: str, log: Path) -> Path:
    """Plant (in a subprocess, so its fp32 Adam state never counts against any row) unless cached."""
    from icu_peft.demo.plant import read_plant_info

    d = planted_dirs(args, sc)[0 if which == "plant" else 1]
    if read_plant_info(d) is None:
        print(f"planting the {which} model ({len(sc[which])} texts) -> {d} ...", flush=True)
        job = {"plant": which, "args": vars(args)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)]
        with open(log, "a") as lf:
            subprocess.run(cmd, stderr=lf, stdout=lf, check=True, env=_worker_env(job["args"]))
    info = read_plant_info(d)
    if info is None:
        raise RuntimeError(f"planting failed; see {log}")
    return d


def plant_worker(job: dict) -> None:
    from icu_peft.demo.plant import plant_records

    args = argparse.Namespace(**job["args"])
    sc = build_scenario(args)
    which = job["plant"]
    probes = sc["probes_forget"] + sc["probes_retain"] if which == "plant" else sc["probes_retain"]
    plant_records(sc[which], probes, plant_settings(args), root=Path(args.cache_dir) if args.cache_dir else None,
                  progress=False)


# ------------------------------------------------------------------------------ the run

def load_results(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def run(args) -> dict:
    from icu_peft.demo.plant import read_plant_info

    out = Path(args.out or RESULTS / f"unlearning_{args.scenario}.json")
    log = Path(args.log or f"/tmp/icu-bench-{args.scenario}.log")
    sc = build_scenario(args)
    data = load_results(out) if args.resume else {}
    data.update(scenario=args.scenario, sizes=sc["sizes"], general_text=sc["general_source"],
                command=" ".join(["python", "benchmarks/unlearning.py"] + sys.argv[1:]),
                settings={k: v for k, v in vars(args).items() if k not in ("worker", "markdown", "resume", "log")},
                plant_settings=asdict(plant_settings(args)))
    data.setdefault("rows", {})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    planted = ensure_planted(args, sc, "plant", log)
    info = read_plant_info(planted)
    data["planting"] = {k: info.get(k) for k in ("epochs", "memorised_at_epoch", "secrets_leaked", "secrets_total",
                                                 "wall_time_s")}
    jobs = [("before-4bit", dict(model_dir=str(planted), quantize=True)),
            ("before-fp32", dict(model_dir=str(planted), quantize=False))]
    for m in methods:
        if m == "oracle":
            continue
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}: choose from {', '.join(list(METHODS) + ['oracle'])}")
        jobs.append((m, dict(model_dir=str(planted), quantize=METHODS[m][2], method=m)))
    if "oracle" in methods:
        jobs.append(("oracle", None))
    for lr in args.sweep_lr:
        jobs.append((f"icu@lr={lr:g}", dict(model_dir=str(planted), quantize=True, method="icu",
                                             overrides={"learning_rate": lr})))
    for name, job in jobs:
        if args.resume and name in data["rows"]:
            print(f"{name}: already in {out}, skipped", flush=True)
            continue
        if name == "oracle":
            job = dict(model_dir=str(ensure_planted(args, sc, "oracle", log)), quantize=True)
            oinfo = read_plant_info(Path(job["model_dir"]))
            data["oracle_planting"] = {k: oinfo.get(k) for k in ("epochs", "memorised_at_epoch", "secrets_leaked",
                                                                 "secrets_total", "wall_time_s")}
        job.update(row=name, args=vars(args))
        base_row = data["rows"].get("before-4bit" if job["quantize"] else "before-fp32")
        # icu-defaults measures its own never-seen band, as a user's request does (explicit thresholds have no
        # band around them); the scores are remembered per base in the icu-peft cache after the first time
        if job.get("method") and job["method"] != "icu-defaults" and base_row and not args.measure_thresholds:
            job["thresholds"] = {k: base_row["measure"]["unseen"][k] for k in ("ma", "el")}
        t = time.time()
        print(f"{name} ...", flush=True)
        row = run_worker(job, log)
        row["row_s"] = round(time.time() - t, 1)
        row["command"] = data["command"]  # rows of a --resume'd file may come from different invocations
        data["rows"][name] = row
        save_results(out, data)
        m = row["measure"]
        print(f"{name}: forget MA {m['forget']['ma']:.3f} EL {m['forget']['el']:.3f} secrets "
              f"{m['forget']['secrets']}/{m['forget']['secrets_total']} | retain MA {m['retain']['ma']:.3f} secrets "
              f"{m['retain']['secrets']}/{m['retain']['secrets_total']} | ppl {m['perplexity']:.2f} | "
              f"MIA {m['mia_auc']} | {row.get('wall_s', '-')} s, {row['peak_rss_mb']:.0f} MB, "
              f"epochs {row.get('epochs', '-')}", flush=True)
    return data


# ------------------------------------------------------------------------------ report

def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def verdicts(data: dict, name: str = "icu") -> List[tuple]:
    """The issue's targets for one row: (target, measured, met?)."""
    rows = data["rows"]
    r, b = rows[name], rows["before-4bit" if METHODS.get(name.split("@")[0], ("", {}, True))[2] else "before-fp32"]
    m, mb = r["measure"], b["measure"]
    th = r["thresholds"]
    out = []
    f = m["forget"]
    ok = f["ma_max"] <= th["ma"] and f["el_max"] <= th["el"]
    out.append(("every forget sample at or below the unseen level (MA, EL10)",
                f"{r['forgotten_samples']}/{f['count']} samples; max MA {f['ma_max']:.3f} vs {th['ma']:.3f}, "
                f"max EL10 {f['el_max']:.3f} vs {th['el']:.3f}", ok))
    if f["secrets_total"]:
        out.append(("secrets of forgotten people extracted: 0", f"{f['secrets']}/{f['secrets_total']}", f["secrets"] == 0))
    dev = max(abs(a - 0.5) for a in m["mia_auc"].values())
    out.append(("MIA AUC (forget vs unseen) within 0.5 +- 0.05",
                ", ".join(f"{k} {v:.3f}" for k, v in m["mia_auc"].items()), dev <= 0.05))
    ratio = m["retain"]["ma"] / mb["retain"]["ma"]
    out.append(("retain MA >= 98% of before", f"{m['retain']['ma']:.3f} / {mb['retain']['ma']:.3f} = {100 * ratio:.1f}%",
                ratio >= 0.98))
    if mb["retain"]["secrets"]:
        sr = m["retain"]["secrets"] / mb["retain"]["secrets"]
        out.append(("retain secrets >= 95% of before", f"{m['retain']['secrets']} / {mb['retain']['secrets']} = "
                                                         f"{100 * sr:.1f}%", sr >= 0.95))
    pr = m["perplexity"] / mb["perplexity"] - 1
    out.append(("general perplexity <= 3% above before", f"{m['perplexity']:.2f} vs {mb['perplexity']:.2f} "
                                                        f"({100 * pr:+.1f}%)", pr <= 0.03))
    if "icu-full" in rows and "wall_s" in rows["icu-full"]:
        full = rows["icu-full"]
        mr = r["peak_rss_mb"] / full["peak_rss_mb"]
        out.append(("peak memory <= 0.35x full-FT ICU", f"{r['peak_rss_mb']:.0f} / {full['peak_rss_mb']:.0f} MB = {mr:.2f}x",
                    mr <= 0.35))
        wr = r["wall_s"] / full["wall_s"]
        out.append(("wall time <= 1.0x full-FT ICU", f"{r['wall_s']:.0f} / {full['wall_s']:.0f} s = {wr:.2f}x", wr <= 1.0))
    bf16 = rows["before-fp32"].get("base_bf16_bytes")
    if bf16 and r.get("weights_bytes"):
        ar = r["weights_bytes"] / bf16
        out.append(("adapter <= 2% of the base's bf16 size", f"{r['weights_bytes'] / 2**20:.2f} MB / "
                                                            f"{bf16 / 2**20:.0f} MB = {100 * ar:.2f}%", ar <= 0.02))
    if "oracle" in rows:
        o = rows["oracle"]["measure"]
        out.append(("within noise of the oracle (forget MA / EL10 / retain MA / ppl)",
                    f"{f['ma']:.3f}/{f['el']:.3f}/{m['retain']['ma']:.3f}/{m['perplexity']:.2f} vs oracle "
                    f"{o['forget']['ma']:.3f}/{o['forget']['el']:.3f}/{o['retain']['ma']:.3f}/{o['perplexity']:.2f}",
                    None))
    return out


def markdown(data: dict) -> str:
    rows = data["rows"]
    names = [n for n in ROW_ORDER if n in rows] + sorted(n for n in rows if n not in ROW_ORDER)
    has_secrets = any(rows[n]["measure"]["forget"]["secrets_total"] for n in names)
    head = ["method", "forget MA mean / max", "forget EL10 mean / max"]
    if has_secrets:
        head.append("forget secrets")
    head += ["MIA AUC loss / zlib / min-k", "retain MA", "retain secrets" if has_secrets else "retain EL10",
             "general ppl", "epochs", "forget wall s", "peak RSS MB", "bytes written"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        r = rows[n]
        m = r["measure"]
        f, rt = m["forget"], m["retain"]
        a = m["mia_auc"]
        cells = [LABELS.get(n, n), f"{f['ma']:.3f} / {f['ma_max']:.3f}", f"{f['el']:.3f} / {f['el_max']:.3f}"]
        if has_secrets:
            cells.append(f"{f['secrets']}/{f['secrets_total']}")
        cells.append(" / ".join(_f(a.get(k)) for k in ("loss", "zlib", "min_k")))
        cells.append(f"{rt['ma']:.3f}")
        cells.append(f"{rt['secrets']}/{rt['secrets_total']}" if has_secrets else _f(rt.get('el')))
        cells += [f"{m['perplexity']:.2f}", str(r.get("epochs", "-")), _f(r.get("wall_s"), "{:.0f}"),
                  _f(r.get("peak_rss_mb"), "{:.0f}"), _f(r.get("bytes_written"), "{:,}")]
        lines.append("| " + " | ".join(cells) + " |")
    u = rows.get("before-4bit", {}).get("measure", {}).get("unseen")
    if u:
        lines.append(f"\nUnseen level (planted model, 4-bit): MA {u['ma']:.3f}, EL10 {u['el']:.3f}"
                     + (f", secrets {u['secrets']}/{u['secrets_total']}" if u["secrets_total"] else "") + ".")
    for name in ("icu", "icu-paper"):
        if name in rows and "before-4bit" in rows:
            lines.append(f"\nTargets for `{name}` ({LABELS[name]}):\n")
            lines.append("| target | measured | met |")
            lines.append("|---|---|---|")
            for t, v, ok in verdicts(data, name):
                lines.append(f"| {t} | {v} | {'see text' if ok is None else ('met' if ok else 'missed')} |")
    return "\n".join(lines)


def _key_value(text: str) -> list:
    """--set KEY=VALUE as [key, value] (the value read as YAML), refused at once when malformed: the worker that
    would apply it runs after the before-rows' minutes of work."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return [key.strip(), yaml.safe_load(value)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenario", choices=["A", "B"], default="A")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {', '.join(DEFAULT_METHODS)}")
    p.add_argument("--lr", type=float, default=2e-3, help="learning rate of the LoRA methods")
    p.add_argument("--full-lr", type=float, default=5e-5, help="learning rate of full-fine-tuning ICU")
    p.add_argument("--batch-size", type=int, default=1,
                   help="forget samples per step, every method (1: one step per sample and epoch)")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--sweep-lr", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                   help="extra icu (LoRA) rows at these learning rates, e.g. 3e-4,3e-3")
    p.add_argument("--people", type=int, default=20, help="A: planted people (10%% are forgotten)")
    p.add_argument("--unseen", type=int, default=10, help="A: unseen people")
    p.add_argument("--seed", type=int, default=0, help="A: corpus seed")
    p.add_argument("--b-samples", type=int, default=32, help="B: samples per set (forget, retain, unseen)")
    p.add_argument("--b-tokens", type=int, default=64, help="B: tokens each sample is truncated to")
    p.add_argument("--b-el-start", type=int, default=0, help="B: shortest prefix EL10 scores (0: half of --b-tokens)")
    p.add_argument("--b-forget-set", default="32_0")
    p.add_argument("--b-retain-set", default="32_1")
    p.add_argument("--b-unseen-set", default="32_2")
    p.add_argument("--plant-max-epochs", type=int, default=40)
    p.add_argument("--general-texts", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of every worker (0: leave as is)")
    p.add_argument("--cache-dir", default=None, help="planted models (default: icu-peft's cache dir)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/unlearning_<S>.json)")
    p.add_argument("--log", default=None, help="workers' stderr (default /tmp/icu-bench-<S>.log)")
    p.add_argument("--measure-thresholds", action="store_true",
                   help="let every forget run measure the unseen level itself (default: reuse the before rows')")
    p.add_argument("--resume", action="store_true", help="keep rows already in the results JSON")
    p.add_argument("--markdown", action="store_true", help="print the tables of the saved results and exit")
    p.add_argument("--merge", default=None, metavar="FILE",
                   help="add the rows of another results JSON (a part run in parallel) to --out, then exit")
    p.add_argument("--replace", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="with --merge: these rows of FILE replace the ones already there")
    p.add_argument("--plant-only", choices=["plant", "oracle", "both"], default=None,
                   help="only make sure the planted (and/or oracle) model is cached, then exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                   help="an ICUConfig field for every method row (after the method's own settings), "
                        "e.g. lora_layers=10")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore")
    for noisy in ("transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if args.worker:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        job = json.loads(args.worker)
        if "plant" in job:
            plant_worker(job)
            return 0
        print("ROW " + json.dumps(worker(job)), flush=True)
        return 0
    if args.scenario == "B" and not (SHARED / "tdec").is_dir():
        print(f"scenario B skipped: {SHARED / 'tdec'} not found (ICU's forget sets live in ../shared)")
        return 0
    if args.merge:
        path = Path(args.out or RESULTS / f"unlearning_{args.scenario}.json")
        data, other = load_results(path), load_results(Path(args.merge))
        added = [k for k in other.get("rows", {}) if k not in data.get("rows", {}) or k in args.replace]
        data.setdefault("rows", {}).update({k: other["rows"][k] for k in added})
        for k in ("oracle_planting",):
            if k in other:
                data[k] = other[k]
        data.setdefault("parts", []).append({"command": other.get("command"), "rows": added})
        save_results(path, data)
        print(f"merged {', '.join(added) or 'nothing'} into {path}")
        return 0
    if args.markdown:
        path = Path(args.out or RESULTS / f"unlearning_{args.scenario}.json")
        if not path.is_file():
            print(f"no results at {path}: run the benchmark first")
            return 2
        print(markdown(json.loads(path.read_text())))
        return 0
    if args.plant_only:
        sc = build_scenario(args)
        log = Path(args.log or f"/tmp/icu-bench-{args.scenario}.log")
        for which in (["plant", "oracle"] if args.plant_only == "both" else [args.plant_only]):
            print(which, ensure_planted(args, sc, which, log))
        return 0
    data = run(args)
    print()
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
