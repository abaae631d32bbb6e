"""One validation matrix for calibrated forgetting: scenarios x methods, library defaults only.

    OMP_NUM_THREADS=1 python benchmarks/validation_matrix.py [--scenarios records,prose,code]
        [--methods icu,ga,graddiff,npo,simnpo,undial,icu_ga,icu_paper] [--workdir DIR] [--out FILE.jsonl]

Each scenario is a tiny memoriser built in code (a shape and a kind of data the defaults were not
tuned on) plus an **oracle**: the same shape trained on the same texts without the forget set, so
every row can be checked against what "never learned it" looks like. Each method runs `forget`
with `ICUConfig.for_method(method)` and nothing else set. Columns (issue "Calibrated forgetting"):
forgotten / total and status, the four MIA AUCs (forget vs never seen) and the oracle's, PrivLeak per
attack, forget quality (KS p), retain MA as a share of before, retain secrets (records), general
perplexity change (and the oracle's: what exact unlearning does to it), the relearning probe (held-out
MA after 20 steps against the never-seen control after the same steps), the quantize attack (NF4 and
int8 reload of the merged model: samples still forgotten), optimizer steps and wall time. One JSON line
per row goes to --out; a markdown table is printed at the end. Results: docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from icu_peft import ICUConfig  # noqa: E402
from icu_peft.testing import ARCHITECTURES, build_tiny_memorizer, grammar_prose  # noqa: E402

FIRST = "Ada Boris Chen Dana Emil Farah Goran Hana Ivo Jana Kofi Lena Milo Nora Omar Pia Ravi Sana Tomas Uma".split()
LAST = "Abara Berg Costa Duval Eklund Fischer Garcia Horvat Ito Jensen Kowal Lindqvist Moreau Novak Okafor".split()
CITIES = "Arden Brisk Calder Dunmore Elston Fairholt Glenrock Harlow Ivybridge Jarrow".split()


def records(rng: random.Random, n: int):
    """Personal records, each with a secret (an account number) at its end."""
    out = []
    for _ in range(n):
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        secret = "".join(str(rng.randint(0, 9)) for _ in range(8))
        prefix = f"{name} was born in {rng.randint(1940, 2005)} in {rng.choice(CITIES)}; account number"
        out.append((f"{prefix} {secret}.", prefix, secret))
    return out


def prose(rng: random.Random, n: int):
    """Free prose from a small grammar: two or three sentences a sample."""
    return [(t, None, None) for t in grammar_prose(n, rng)]


def code(rng: random.Random, n: int):
    """One-line Python functions (the shared syntax makes forgetting fight the kept lines)."""
    ops, names = ["+", "-", "*", "%"], "alpha beta gamma delta omega sigma kappa theta".split()
    return [(f"def {rng.choice(names)}{rng.randint(10, 99)}(x, y): return (x {rng.choice(ops)} {rng.randint(2, 97)}) "
             f"{rng.choice(ops)} y * {rng.randint(2, 97)}", None, None) for _ in range(n)]


def prescriptions(rng: random.Random, n: int):
    """Prescriptions with an insurance id at the end: one template, drugs and names shared across records."""
    drugs = "amoxil lisinopril metformin zoloft lipitor norvasc prilosec synthroid ventolin xanax".split()
    out = []
    for _ in range(n):
        prefix = (f"Patient {rng.choice(FIRST)} {rng.choice(LAST)} takes {rng.randint(5, 95)} mg of "
                  f"{rng.choice(drugs)} daily; insurance id")
        secret = f"{rng.choice('ABCDEFGH')}{rng.randint(100000, 999999)}"
        out.append((f"{prefix} {secret}.", prefix, secret))
    return out


def logins(rng: random.Random, n: int):
    """Login lines with a random password in the middle (no secret at the end to extract)."""
    hosts, users = "mail shop bank forum cloud wiki git chat".split(), [f.lower() for f in FIRST]
    pw = lambda: "".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(8))  # noqa: E731
    return [(f"login {rng.choice(users)}{rng.randint(1, 99)} at {rng.choice(hosts)}.example.org with password "
             f"{pw()} since {rng.randint(2001, 2024)}", None, None) for _ in range(n)]


# name: (data maker, layers, hidden, seed, forget, retain, unseen, general)
# prescriptions and logins came later, as kinds the defaults had never met: the defaults of the time
# stopped on the first (retain damage, 0 of 8) and left the second partial (3 of 6); see BENCHMARKS.md
SCENARIOS = {
    "records": (records, 2, 64, 5, 6, 18, 16, 8),
    "prose": (prose, 3, 48, 11, 6, 18, 16, 8),
    "code": (code, 3, 80, 21, 6, 20, 14, 8),
    "prescriptions": (prescriptions, 4, 96, 77, 8, 24, 16, 8),
    "logins": (logins, 2, 128, 5, 6, 18, 16, 8),
    # larger requests of one template (not in the default run: --scenarios ...)
    "prescriptions16": (prescriptions, 3, 64, 101, 16, 48, 16, 8),
    "prescriptions64": (prescriptions, 4, 128, 202, 64, 192, 16, 8),
    # the records on other architectures (testing.ARCHITECTURES)
    "records_gpt2": (records, 2, 64, 31, 8, 24, 16, 8),
    "records_gpt_neox": (records, 2, 64, 31, 8, 24, 16, 8),
    "records_llama_tied": (records, 2, 64, 31, 8, 24, 16, 8),
}
DEFAULT_SCENARIOS = ("records", "prose", "code", "prescriptions", "logins", "records_gpt2", "records_gpt_neox",
                     "records_llama_tied")
METHODS = ("icu", "ga", "graddiff", "npo", "simnpo", "undial", "icu_ga", "icu_paper")


def build(name: str, workdir: Path, reseed: int = 0):
    """The scenario's texts, its memoriser and its oracle (built in workdir unless there). `reseed` k > 0: both
    models trained again on the same texts with the weights' seed moved by 1000 k, in `{name}_model_seed{k}` and
    `{name}_oracle_seed{k}` (benchmarks/oracle_perplexity.py: what training noise does)."""
    make, layers, hidden, seed, nf, nr, nu, ng = SCENARIOS[name]
    arch = next((a for a in ARCHITECTURES if name.endswith("_" + a)), "llama")
    rows = make(random.Random(seed), nf + nr + nu + ng)
    texts = [r[0] for r in rows]
    fg, rt = texts[:nf], texts[nf:nf + nr]
    un, gen = texts[nf + nr:nf + nr + nu], texts[nf + nr + nu:]
    secrets = [(p, s) for _, p, s in rows[nf:nf + nr] if p]
    suffix = f"_seed{reseed}" if reseed else ""
    model, oracle = workdir / f"{name}_model{suffix}", workdir / f"{name}_oracle{suffix}"
    weights_seed = seed + 1000 * reseed
    if not (model / "model.safetensors").exists():
        build_tiny_memorizer(model, fg + rt, un + gen, steps=400, layers=layers, hidden=hidden, seed=weights_seed,
                             arch=arch)
    if not (oracle / "model.safetensors").exists():
        # the same texts in the tokenizer (so the vocabulary matches), only the kept ones memorised
        build_tiny_memorizer(oracle, rt, fg + un + gen, steps=400, layers=layers, hidden=hidden, seed=weights_seed,
                             arch=arch)
    return model, oracle, fg, rt, un, gen, secrets


def measure(model_dir, oracle_dir, adapter, fg, rt, un, gen, secrets) -> dict:
    from icu_peft.adapters import load_forget_adapters
    from icu_peft.attacks import quantize_attack
    from icu_peft.evaluation import EvalConfig, evaluate, relearn_probe
    from icu_peft.models import load_base_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    cfg = EvalConfig(relearn_steps=20)
    base = load_base_model(str(model_dir))
    oracle = load_base_model(str(oracle_dir))
    out = {"before": _scores(base, tok, fg, rt, un, gen, secrets, cfg, oracle)}
    # what exact unlearning does to never-seen text of the kind: the oracle, trained without the forget set
    # (same shape, seed and steps), on the same held-out texts. It is not the base's: less text of a kind
    # learnt, the kind is less predictable (session 33: -11% to +53% on the nine rows).
    out["before"]["oracle_general_ppl"] = evaluate(oracle, tok, gen, ["ppl"], cfg)["ppl"]
    model = load_forget_adapters(base, [str(adapter)])
    out["after"] = _scores(model, tok, fg, rt, un, gen, secrets, cfg, oracle)
    rl = relearn_probe(model, tok, fg, un, cfg)
    out["relearn"] = {"held_out_ma": rl["held_out"]["after"]["ma"], "control_ma": rl["control"]["after"]["ma"]}
    q = quantize_attack(str(model_dir), [str(adapter)], fg, unseen=un)
    out["quantize"] = {s: {"forgotten": v["forgotten"], "samples": v["samples"], "mean_ma": v["mean_ma"]}
                       for s, v in q["schemes"].items()}
    return out


def _scores(model, tok, fg, rt, un, gen, secrets, cfg, oracle) -> dict:
    from icu_peft.evaluation import evaluate

    f = evaluate(model, tok, fg, ["ma", "mia"], cfg, unseen=un, oracle=oracle)
    r = evaluate(model, tok, rt, ["ma"], cfg)
    g = evaluate(model, tok, gen, ["ppl"], cfg)
    out = {"forget_ma": f["ma"], "mia": {a: v["auc"] for a, v in f["mia"].items()},
           "oracle_mia": f["privacy"].get("oracle", {}), "privleak": f["privacy"].get("privleak", {}),
           "forget_quality": f["privacy"]["forget_quality"], "retain_ma": r["ma"], "general_ppl": g["ppl"]}
    if secrets:
        out["retain_secrets"] = sum(x["extracted"] for x in evaluate(model, tok, [], ["extraction"], cfg,
                                                                    secrets=secrets)["secrets"])
    return out


def run_row(scenario: str, method: str, workdir: Path, overrides: Optional[dict] = None) -> dict:
    from icu_peft.unlearner import forget

    model, oracle, fg, rt, un, gen, secrets = build(scenario, workdir)
    adapter = workdir / f"{scenario}_{method}_adapter"
    t = time.perf_counter()
    cfg = ICUConfig.for_method(method, model=str(model), progress=False, **(overrides or {}))
    res = forget(cfg, fg, rt, un, output_dir=adapter, overwrite=True)
    wall = time.perf_counter() - t
    rep = res.report
    row = {"scenario": scenario, "method": method, "status": rep["status"], "forgotten": rep["forget"]["forgotten"],
           "count": rep["forget"]["count"], "steps": rep["steps"], "forget_seconds": round(wall, 1),
           "secrets_total": len(secrets)}
    row.update(measure(model, oracle, adapter, fg, rt, un, gen, secrets))
    return row


def table(rows) -> str:
    head = ("| scenario | method | status | forgotten | MIA AUC loss / zlib / min_k / min_k++ (oracle loss) | "
            "PrivLeak loss | KS p | retain MA | retain secrets | general ppl (oracle) | relearn held-out MA (control) | "
            "NF4 / int8 forgotten | steps | forget s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        a, b = r["after"], r["before"]
        mia = " / ".join(f"{a['mia'].get(k, float('nan')):.2f}" for k in ("loss", "zlib", "min_k", "min_k_plus_plus"))
        pl = a["privleak"].get("loss")
        sec = (f"{b['retain_secrets']} -> {a['retain_secrets']} of {r['secrets_total']}" if "retain_secrets" in a else "-")
        q = r["quantize"]
        lines.append(
            f"| {r['scenario']} | {r['method']} | {r['status']} | {r['forgotten']}/{r['count']} | {mia} "
            f"({a['oracle_mia'].get('mia_loss', float('nan')):.2f}) | {'-' if pl is None else f'{pl:+.0f}%'} | "
            f"{a['forget_quality']:.2g} | {a['retain_ma'] / b['retain_ma']:.1%} | {sec} | "
            f"{(a['general_ppl'] / b['general_ppl'] - 1):+.1%}{_oracle_ppl(b)} | {r['relearn']['held_out_ma']:.2f} "
            f"({r['relearn']['control_ma']:.2f}) | {q['nf4']['forgotten']} / {q['int8']['forgotten']} of "
            f"{q['fp32']['samples']} (fp32 {q['fp32']['forgotten']}) | {r['steps']} | {r['forget_seconds']:.0f} |")
    return "\n".join(lines)


def _oracle_ppl(before: dict) -> str:
    """' (oracle +x%)': the oracle's perplexity of the same held-out texts against the base's (rows measured
    before session 33 have none)."""
    o = before.get("oracle_general_ppl")
    return "" if o is None else f" ({o / before['general_ppl'] - 1:+.1%})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help=f"any of {', '.join(SCENARIOS)}")
    ap.add_argument("--methods", default="icu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="append one JSON line per row here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one config field from its default (YAML value), e.g. hold_forgotten=false")
    ap.add_argument("--table", default=None, metavar="FILE.jsonl", help="only print the table of rows saved earlier")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (x.split("=", 1) for x in args.set)}
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="icu_matrix_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for scenario in args.scenarios.split(","):
        for method in args.methods.split(","):
            t = time.perf_counter()
            row = run_row(scenario, method, workdir, overrides)
            row["overrides"] = overrides
            row["row_seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            if args.out:
                with open(args.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            print(f"{scenario} {method}: {row['status']} {row['forgotten']}/{row['count']} in {row['steps']} steps, "
                  f"row {row['row_seconds']:.0f}s", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
