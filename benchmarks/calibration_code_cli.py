"""`icu-peft forget` with no tuning flags on a code-like memoriser (3 layers, width 80), as a user runs it.

    python benchmarks/calibration_code_cli.py [WORKDIR]

Builds a Llama that memorises 26 one-line Python functions (6 to forget, 20 to keep) and never sees
14 more, writes them as jsonl, runs the CLI and prints its exit status, its summary and each
sample's place against the never-seen band. Results: docs/BENCHMARKS.md.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from icu_peft.testing import build_tiny_memorizer

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="icu_code_cli_"))
work.mkdir(parents=True, exist_ok=True)
rng = random.Random(21)
ops = ["+", "-", "*", "%"]
names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def line() -> str:
    n = rng.choice(names) + str(rng.randint(10, 99))
    return f"def {n}(x, y): return (x {rng.choice(ops)} {rng.randint(2, 97)}) {rng.choice(ops)} y * {rng.randint(2, 97)}"


texts = [line() for _ in range(40)]
fg, rt, un = texts[:6], texts[6:26], texts[26:40]
if not (work / "model" / "model.safetensors").exists():
    build_tiny_memorizer(work / "model", fg + rt, un, steps=400, layers=3, hidden=80, seed=21)
for name, t in (("forget", fg), ("retain", rt), ("unseen", un)):
    (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": x}) + "\n" for x in t))
out = work / "adapter"
cmd = [sys.executable, "-m", "icu_peft.cli", "forget", "--no-progress", "--model", str(work / "model"),
       "--forget", str(work / "forget.jsonl"), "--retain", str(work / "retain.jsonl"),
       "--unseen", str(work / "unseen.jsonl"), "--out", str(out), "--overwrite"]
p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
print("exit", p.returncode)
print(p.stdout)
print("\n".join(l for l in p.stderr.splitlines() if l.startswith("icu-peft:")))
m = json.loads((out / "forget_manifest.json").read_text())
print("samples:", [s["band"] for s in m["samples"]], "(the manifest ships no per-sample score: disclosure.py)")
print("targets:", m["targets"])
