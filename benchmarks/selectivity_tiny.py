"""Selectivity of ICU objectives on the tiny test model (the table in docs/METHOD.md).

    OMP_NUM_THREADS=1 python benchmarks/selectivity_tiny.py '[{"method": "icu_paper"}, {"retain_kl_samples": 12}]'

Each JSON object overrides ICUConfig fields (a `method` key picks a preset first). Prints one line
per variant: epochs, forget MA after (mean, max), retain MA before -> after.
"""

import json
import os
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore")

from icu_peft import ICUConfig  # noqa: E402
from icu_peft.testing import build_tiny_memorizer, random_sentences  # noqa: E402
from icu_peft.unlearner import forget  # noqa: E402


def main() -> None:
    variants = json.loads(sys.argv[1]) if len(sys.argv) > 1 else [{"method": "icu_paper"}, {"retain_kl_samples": 12}]
    fg, rt, un = random_sentences(4, seed=1), random_sentences(12, seed=2), random_sentences(12, seed=3)
    model_dir = os.environ.get("TINY_MODEL_DIR") or tempfile.mkdtemp(prefix="tiny-")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_memorizer(model_dir, fg + rt, un, steps=300)
    for v in variants:
        v = dict(v)
        base = dict(model=model_dir, learning_rate=2e-3, max_epochs=200, batch_size=4, progress=False, seed=0)
        cfg = ICUConfig.for_method(v.pop("method", "icu"), **{**base, **v})
        t = time.time()
        rep = forget(cfg, fg, rt, un).report
        print(json.dumps(v), cfg.method, f"{time.time() - t:.1f}s", rep["status"], f"epochs {rep['epochs']}",
              "thresholds MA %.3f EL %.3f" % (rep["thresholds"]["ma"], rep["thresholds"]["el"]),
              "forget MA %.3f (max %.3f) EL %.3f" % (rep["forget"]["after"]["ma"],
                                                     max(s["after"]["ma"] for s in rep["samples"]),
                                                     rep["forget"]["after"]["el"]),
              "retain MA %.3f -> %.3f" % (rep["retain"]["before"]["ma"], rep["retain"]["after"]["ma"]), flush=True)


if __name__ == "__main__":
    main()
