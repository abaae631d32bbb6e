"""One ICU setting on the demo's planted records: epochs, time, forget/kept figures (how the demo was tuned).

    python benchmarks/demo_tuning.py PLANTED_DIR '{"learning_rate": 3e-3, "lora_layers": 10, ...}'

PLANTED_DIR is a planted model of `make_corpus(num_people=20, num_unseen=10, forget_fraction=0.1,
seed=0)` (benchmark A's, `python benchmarks/unlearning.py --scenario A --plant-only plant`). The JSON
overrides `icu_peft.demo.run.demo_icu_config()`; the thresholds are benchmark A's measured unseen
level (MA 0.687, EL10 0.0227 on the 4-bit planted model). Prints one `RESULT {...}` line: status,
epochs, wall time, retain MA before/after (from the forget report), and for the first 8 kept people
and the 2 forgotten ones MA, EL10 and secrets extracted. No record text is printed.
"""

from __future__ import annotations

import json
import logging
import sys
import time


def main(argv=None) -> int:
    from icu_peft.demo.records import make_corpus
    from icu_peft.demo.run import demo_icu_config, measure_group
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.unlearner import forget

    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 2:
        print(__doc__)
        return 2
    planted, overrides = argv[0], json.loads(argv[1])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    corpus = make_corpus(num_people=20, num_unseen=10, forget_fraction=0.1, seed=0)
    tok = load_tokenizer(planted)
    base = load_base_model(planted, True)
    cfg = demo_icu_config(**{"progress": False, "ma_threshold": 0.687, "el_threshold": 0.0227, **overrides})
    t0 = time.time()
    # The unseen people's records: the thresholds above are fixed, but nll_target ('unseen', the demo's
    # default) takes its level from them.
    r = forget(cfg, corpus.forget_texts, corpus.retain_texts, corpus.unseen_texts, base_model=base, tokenizer=tok)
    wall = time.time() - t0
    kept = measure_group(r.model, tok, corpus.retain_texts[:8], corpus.probes(corpus.kept_people[:8]), 10)
    gone = measure_group(r.model, tok, corpus.forget_texts, corpus.probes(corpus.forget_people), 10)
    pick = ("ma", "el", "secrets", "secrets_total")
    print("RESULT " + json.dumps({
        "overrides": overrides, "status": r.report["status"], "epochs": r.report["epochs"], "wall_s": round(wall),
        "retain_ma": {k: r.report["retain"][k]["ma"] for k in ("before", "after")},
        "kept8": {k: kept[k] for k in pick}, "forgotten": {k: gone[k] for k in pick}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
