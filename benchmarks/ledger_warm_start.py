"""One warm-started ledger consolidation on the real model, alone: the second one-person request.

    OMP_NUM_THREADS=1 python benchmarks/ledger_warm_start.py --work W [--threads 1]

`benchmarks/ledger_real.py --work W --requests 2` keeps the served adapter after the first request in
W/ledger-at/N1; this trains the consolidation of requests 0 and 1 from it, exactly as
`icu_peft.ledger.consolidate` would (the same config and seed as ledger_real's N = 2), without the rest of
that benchmark, and prints status, steps and seconds as JSON. Run ledger_real first (N = 1 at least).
Results: docs/BENCHMARKS.md, "Forget ledger and stacking".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger_real as LR  # noqa: E402

from icu_peft.models import load_base_model  # noqa: E402
from icu_peft.unlearner import forget  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path, help="ledger_real's work directory (holds ledger-at/N1)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    start = a.work / "ledger-at" / "N1"
    if not (start / "forget_manifest.json").is_file():
        ap.error(f"{start} has no adapter: run benchmarks/ledger_real.py --work {a.work} --requests 2 first")
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    corpus = LR.people()
    planted, tok = LR.planted_model(corpus)
    cfg = dataclasses.replace(LR.config(planted, "consolidated-2", 102), init_adapter=str(start))
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        r = forget(cfg, [corpus.people[i].text for i in range(2)], [corpus.people[i].text for i in range(2, 12)],
                   corpus.unseen_texts, output_dir=out, overwrite=True,
                   base_model=load_base_model(str(planted), quantize=True), tokenizer=tok)
    rep = r.report
    print(json.dumps({"status": rep["status"], "steps": rep["steps"], "forgotten": rep["forget"]["forgotten"],
                      "seconds": round(time.time() - t0, 1)}))
    return 0 if rep["status"] == "forgotten" else 1


if __name__ == "__main__":
    raise SystemExit(main())
