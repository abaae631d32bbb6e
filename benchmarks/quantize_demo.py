"""The quantize attack on the quick demo's forget adapter (the real model, SmolLM2-135M).

    python benchmarks/quantize_demo.py DEMO_OUT [WORKDIR]

Rebuilds the quick demo's corpus (same seed), writes its forgotten and never-planted records to
WORKDIR as jsonl (they stay on this machine), and runs
`icu-peft eval --model PLANTED --adapter DEMO_OUT/forget-adapter --data forget.jsonl
--unseen unseen.jsonl --metrics ma --attack quantize`. Results: docs/BENCHMARKS.md.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from icu_peft.demo.records import make_corpus
from icu_peft.demo.run import DemoOptions

demo_out = Path(sys.argv[1])
work = Path(sys.argv[2] if len(sys.argv) > 2 else tempfile.mkdtemp(prefix="icu_qdemo_"))
work.mkdir(parents=True, exist_ok=True)
opts = DemoOptions.quick()
corpus = make_corpus(opts.num_people, opts.num_unseen, opts.forget_fraction, opts.seed)
for name, texts in (("forget", corpus.forget_texts), ("unseen", corpus.unseen_texts)):
    (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
planted = json.loads((demo_out / "demo_report.json").read_text())["planted_model"]
cmd = [sys.executable, "-m", "icu_peft.cli", "eval", "--model", planted, "--adapter", str(demo_out / "forget-adapter"),
       "--data", str(work / "forget.jsonl"), "--unseen", str(work / "unseen.jsonl"), "--metrics", "ma",
       "--max-length", "128", "--attack", "quantize"]
sys.exit(subprocess.call(cmd))
