"""`icu-peft eval`: score a base model with a stack of forget adapters (MA, EL_n, perplexity, ...)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ._common import add_model_args, load_model_with_adapters, print_json

logger = logging.getLogger("icu_peft")


def add_parser(sub) -> None:
    from ..evaluation import METRICS

    p = sub.add_parser("eval", help="measure what a model (with forget adapters) remembers and what it kept",
                       description="Score the model with every --adapter stacked on top. Metrics: "
                                   f"{', '.join(METRICS)}. See docs/EVALUATION.md.")
    add_model_args(p)
    p.add_argument("--data", help="texts to score: .jsonl (field text), .csv (column text) or .txt")
    p.add_argument("--codebook", default=None, metavar="DIR", help="CodeUnlearn codebook to hook into the model")
    p.add_argument("--code-mask", action="append", default=[], metavar="DIR",
                   help="CodeUnlearn code mask (needs --codebook); repeat to stack")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated, from {','.join(METRICS)} (default: ma,el,ppl)")
    p.add_argument("--text-field", default="text", help="jsonl field / csv column holding the text")
    p.add_argument("--el-n", type=int, default=10, help="n of EL_n")
    p.add_argument("--el-start", type=int, default=1,
                   help="shortest prefix EL_n scores: 1 = Jang et al.; ICU's tail-only variant scores t >= 150 of 200")
    p.add_argument("--max-length", type=int, default=200, help="MA/EL/BLEU/MIA use the first N tokens of a text")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--ppl-window", type=int, default=None, help="perplexity window (default: model context, max 1024)")
    p.add_argument("--ppl-stride", type=int, default=None, help="perplexity window stride (default: window/2)")
    p.add_argument("--unseen", help="text the model never saw (non-members for 'mia'; control for --relearn)")
    p.add_argument("--secrets", help="jsonl with fields prefix and secret, for 'extraction'")
    p.add_argument("--oracle", metavar="DIR", help="with 'mia': a model that never saw --data (retrained without it); "
                                                   "adds PrivLeak per attack (MUSE)")
    p.add_argument("--relearn", type=int, default=0, metavar="K",
                   help="relearning probe: fine-tune a throwaway LoRA K steps on part of --data, score the rest")
    p.add_argument("--relearn-lr", type=float, default=1e-3, help="relearning probe learning rate")
    p.add_argument("--attack", action="append", default=[], choices=["quantize"],
                   help="quantize: merge the --adapter stack into --model in float32, reload it in NF4 and int8 and "
                        "re-score --data against each adapter's thresholds and never-seen band (Zhang et al. 2025)")
    p.add_argument("--quant-schemes", default="nf4,int8", help="schemes of --attack quantize (from nf4,int8)")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (needs the 'eval' extra)")
    p.add_argument("--tasks-include", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument("--tasks-limit", type=float, default=None, help="lm-eval: at most this many examples per task")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def read_secrets(path: str) -> list:
    """(prefix, secret) pairs from a jsonl file with string fields `prefix` and `secret`."""
    from ..errors import InputError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"file not found: {p}")
    pairs = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{p}:{lineno}: not valid JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prefix"), str) or not isinstance(obj.get("secret"), str):
            raise InputError(f"{p}:{lineno}: needs string fields 'prefix' and 'secret'")
        if not obj["prefix"].strip() or not obj["secret"].strip():
            raise InputError(f"{p}:{lineno}: empty prefix or secret")
        pairs.append((obj["prefix"], obj["secret"]))
    if not pairs:
        raise InputError(f"{p} holds no prefix/secret pairs")
    return pairs


def run(args) -> int:
    from ..data import read_texts
    from ..errors import InputError
    from ..evaluation import EvalConfig, evaluate, parse_metrics, relearn_probe, run_lm_eval

    metrics = parse_metrics(args.metrics)
    config = EvalConfig(el_n=args.el_n, el_start=args.el_start, max_length=args.max_length, batch_size=args.batch_size,
                        ppl_window=args.ppl_window, ppl_stride=args.ppl_stride, relearn_steps=args.relearn,
                        relearn_lr=args.relearn_lr)
    needs_text = any(m != "extraction" for m in metrics) or args.relearn or args.attack
    if needs_text and not args.data:
        raise InputError("no data: give --data FILE")
    # read every input before loading the model: a bad file should fail in a second, not a minute
    texts = read_texts(args.data, args.text_field) if args.data else []
    unseen = read_texts(args.unseen, args.text_field) if args.unseen else None
    secrets = read_secrets(args.secrets) if args.secrets else None
    if "mia" in metrics and not unseen:
        raise InputError("metric 'mia' needs --unseen FILE (text the model never saw)")
    if "extraction" in metrics and not secrets:
        raise InputError("metric 'extraction' needs --secrets FILE (jsonl with prefix and secret)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []

    if args.code_mask and not args.codebook:
        raise InputError("--code-mask needs --codebook")
    model, tok = load_model_with_adapters(args)
    adapters = getattr(model, "icu_adapters", [])
    if args.codebook:
        from ..codebook import load_codebook_model

        model = load_codebook_model(model, args.codebook, args.code_mask, force=args.force)
    # With one adapter, its manifest's salt gives the samples the ids the manifest uses.
    from ..idkeys import manifest_key

    salt = manifest_key(adapters[0][2]) if len(adapters) == 1 else None
    result = {"model": args.model, "adapters": [d for _, d, _ in adapters]}
    oracle = None
    if args.oracle:
        if "mia" not in metrics:
            raise InputError("--oracle needs the 'mia' metric")
        from ..models import load_base_model

        oracle = load_base_model(args.oracle, quantize=not args.no_quantize, trust_remote_code=args.trust_remote_code)
    from ..dequant import dense_weights

    # a 4-bit base on the CPU: dequantize its frozen weights once, not at every forward (dequant.py)
    with dense_weights(model, "auto", next(model.parameters()).device):
        result.update(evaluate(model, tok, texts, metrics, config, unseen=unseen, secrets=secrets, salt=salt,
                               oracle=oracle))
        if args.relearn:
            result["relearn"] = relearn_probe(model, tok, texts, unseen, config)
    if "quantize" in args.attack:
        from ..attacks import quantize_attack

        schemes = [x.strip() for x in args.quant_schemes.split(",") if x.strip()]
        result["quantize"] = quantize_attack(args.model, args.adapter, texts, schemes, unseen=unseen,
                                             gguf_file=args.gguf_file, force=args.force,
                                             trust_remote_code=args.trust_remote_code, batch_size=args.batch_size)
    if tasks:
        result["lm_eval"] = run_lm_eval(model, tok, tasks, args.tasks_include, args.tasks_limit)

    if args.json:
        print_json(_finite(result))
    else:
        print(format_table(result))
    return 0


def _finite(obj):
    """JSON has no inf/nan: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def format_table(r: dict) -> str:
    """The result as a plain-text report: means, then one row per sample."""
    lines = [f"model: {r['model']}" + (f"  adapters: {', '.join(r['adapters'])}" if r["adapters"] else "")]
    means = [(k, r[k]) for k in ("ma", "el", "ppl", "bleu", "extraction") if k in r]
    if means:
        lines.append(f"{r['count']} samples   " + "   ".join(f"{k.upper()} {v:.4f}" for k, v in means))
    if "mia" in r:
        lines.append(f"membership inference vs {r['unseen_count']} unseen (ROC-AUC, 0.5 = indistinguishable): "
                     + "   ".join(f"{a} {v['auc']:.3f}" for a, v in r["mia"].items()))
    pv = r.get("privacy")
    if pv:
        lines.append(f"privacy: forget_quality (KS p vs unseen) {pv['forget_quality']:.3g}   "
                     f"extraction_strength {pv['extraction_strength']:.3f}"
                     + ("   privleak " + "  ".join(f"{a} {v:+.1f}%" for a, v in pv["privleak"].items())
                        if pv.get("privleak") else ""))
    cols = [k for k in ("ma", "el", "ppl", "bleu", "mia_loss") if r["samples"] and k in r["samples"][0]]
    if cols:
        head = f"{'#':>4} {'id':16} {'tokens':>6} " + " ".join(f"{c:>9}" for c in cols)
        lines += ["", head, "-" * len(head)]
        for s in r["samples"]:
            lines.append(f"{s['index']:>4} {s.get('id', ''):16} {s.get('tokens', 0):>6} "
                         + " ".join(f"{s[c]:>9.4f}" for c in cols))
    if "relearn" in r:
        rl = r["relearn"]
        h = rl["held_out"]
        lines += ["", f"relearning probe: {rl['steps']} steps on {rl['train_count']} samples, "
                      f"{rl['held_out_count']} held out"]
        lines.append(f"  held-out  MA {h['before']['ma']:.4f} -> {h['after']['ma']:.4f}   "
                     f"EL {h['before']['el']:.4f} -> {h['after']['el']:.4f}")
        if rl.get("control"):
            c = rl["control"]
            lines.append(f"  control   MA {c['before']['ma']:.4f} -> {c['after']['ma']:.4f}   "
                         f"EL {c['before']['el']:.4f} -> {c['after']['el']:.4f}")
        if rl.get("recovery"):
            rec = rl["recovery"]
            lines.append("  recovered share of the forgotten gap: "
                         + "   ".join(f"{k.upper()} {'n/a' if v is None else f'{v:.2f}'}" for k, v in rec.items()))
    if "quantize" in r:
        q = r["quantize"]
        lines += ["", "quantize attack (merged in float32, reloaded; each sample against its manifest's band):"]
        for scheme, v in q["schemes"].items():
            back = q["recovered"].get(scheme, [])
            lines.append(f"  {scheme:5} {v['forgotten']}/{v['samples']} forgotten   MA {v['mean_ma']:.4f}   "
                         f"EL {v['mean_el']:.4f}   NLL {v['mean_nll']:.3f}"
                         + (f"   loss AUC {v['mia_loss_auc']:.3f}" if "mia_loss_auc" in v else "")
                         + (f"   {len(back)} came back" if scheme != "fp32" else ""))
        lines.append("  forgetting " + ("holds in every precision" if q["holds"] else
                                        "does NOT hold in every precision (see the rows above; docs/EVALUATION.md)"))
    if "lm_eval" in r:
        lines.append("")
        for task, ms in r["lm_eval"].items():
            lines.append(f"lm-eval {task}: " + "   ".join(f"{k} {v:.4f}" for k, v in ms.items()))
    return "\n".join(lines)
