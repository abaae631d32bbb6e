"""Membership attacks against never-seen text the forget run never saw: fresh memorisers, `icu-peft forget`
with no flags, then `icu-peft eval --metrics mia` against a held-out half of the never-seen text.

    OMP_NUM_THREADS=1 python benchmarks/heldout_attack.py --workdir W [--label new] [--config extra.yaml]

Why held out: the forget loop centres the set against the never-seen samples it is given, so the report's
AUC is measured on the very samples it was fitted to; an attacker compares with other never-seen text. Each
memoriser (benchmarks/fresh_memoriser.py, kinds and shapes no matrix scenario has) gets 40 never-seen texts:
the first 16 go to `--unseen`, the last 24 are the attack's non-members. Prints one JSON line per memoriser:
status, forgotten, steps, retain MA before / after, held-out AUC of each attack, the held-out texts'
perplexity before / after / relative change (`same_kind_ppl`). Results: docs/BENCHMARKS.md,
"Centring in the shipped view".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name: kind, architecture, layers, hidden, seed, forget, retain
MEMORISERS = {
    "neox_lab": ("lab", "gpt_neox", 3, 96, 5151, 12, 36),
    "llama_ship": ("ship", "llama", 2, 128, 6161, 16, 48),
    "gpt2_lab": ("lab", "gpt2", 2, 96, 7171, 10, 30),
    "llama_lab": ("lab", "llama", 3, 96, 8181, 12, 36),
}
GIVEN, HELD_OUT = 16, 24


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "icu_peft.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ))


def run_one(name: str, workdir: Path, label: str, config: str | None) -> dict:
    kind, arch, layers, hidden, seed, forget, retain = MEMORISERS[name]
    w = workdir / name
    if not (w / "model" / "model.safetensors").exists():
        subprocess.run([sys.executable, str(HERE / "fresh_memoriser.py"), str(w), "--kind", kind, "--arch", arch,
                        "--layers", str(layers), "--hidden", str(hidden), "--seed", str(seed), "--forget", str(forget),
                        "--retain", str(retain), "--unseen", str(GIVEN + HELD_OUT)], check=True, capture_output=True)
    unseen = (w / "unseen.jsonl").read_text().splitlines()
    (w / "unseen_given.jsonl").write_text("\n".join(unseen[:GIVEN]) + "\n")
    (w / "unseen_held_out.jsonl").write_text("\n".join(unseen[GIVEN:GIVEN + HELD_OUT]) + "\n")
    adapter = w / f"adapter_{label}"
    args = ["forget", "--model", str(w / "model"), "--forget", str(w / "forget.jsonl"), "--retain",
            str(w / "retain.jsonl"), "--unseen", str(w / "unseen_given.jsonl"), "--out", str(adapter),
            "--overwrite", "--no-progress"] + (["--config", config] if config else [])
    done = cli(*args)
    m = re.search(r"status: (\w+); (\d+) of (\d+) samples forgotten after (\d+) steps", done.stdout + done.stderr)
    row = dict(memoriser=name, label=label, exit=done.returncode)
    if m:
        row.update(status=m.group(1), forgotten=int(m.group(2)), count=int(m.group(3)), steps=int(m.group(4)))
    if not (adapter / "report.json").exists():
        return row
    report = json.loads((adapter / "report.json").read_text())
    row.update(retain_ma=[round(report["retain"]["before"]["ma"], 4), round(report["retain"]["after"]["ma"], 4)])
    ev = cli("eval", "--model", str(w / "model"), "--adapter", str(adapter), "--data", str(w / "forget.jsonl"),
             "--unseen", str(w / "unseen_held_out.jsonl"), "--metrics", "mia", "--json")
    mia = json.loads(ev.stdout).get("mia", {}) if ev.returncode == 0 else {}
    row["held_out_auc"] = {k: round(v["auc"], 3) for k, v in mia.items() if isinstance(v, dict) and "auc" in v}
    # what the adapter does to never-seen text of the kind that neither the run nor the centring saw
    ppl = same_kind_ppl(w / "model", w / "unseen_held_out.jsonl", adapter)
    if ppl:
        row["same_kind_ppl"] = ppl
    return row


def same_kind_ppl(model: Path, texts: Path, adapter: Path) -> list | None:
    """[before, after, after / before - 1]: the perplexity of `texts` under the 4-bit base, then with `adapter`
    (the base's is kept beside the texts, the same for every label); None if an eval failed."""
    cached = texts.with_name(texts.stem + "_base_ppl.json")
    before = json.loads(cached.read_text())["ppl"] if cached.exists() else _ppl(model, texts, None)
    if before is not None and not cached.exists():
        cached.write_text(json.dumps({"ppl": before}))
    after = _ppl(model, texts, adapter)
    if before is None or after is None:
        return None
    return [round(before, 3), round(after, 3), round(after / before - 1, 4)]


def _ppl(model: Path, texts: Path, adapter: Path | None) -> float | None:
    ev = cli("eval", "--model", str(model), "--data", str(texts), "--metrics", "ppl", "--json",
             *(["--adapter", str(adapter)] if adapter is not None else []))
    return json.loads(ev.stdout)["ppl"] if ev.returncode == 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--label", default="defaults", help="names this run's adapters (adapter_LABEL)")
    ap.add_argument("--config", default=None, help="a recipe YAML passed to `icu-peft forget --config` (none: defaults)")
    ap.add_argument("--memorisers", default=",".join(MEMORISERS))
    args = ap.parse_args()
    for name in args.memorisers.split(","):
        print(json.dumps(run_one(name, Path(args.workdir), args.label, args.config)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
