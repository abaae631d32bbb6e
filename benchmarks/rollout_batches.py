"""EL_n roll-outs with finished rows leaving the decoding batch (the default) against every row decoded to the
batch's longest, side by side in one process on the demo's planted model: seconds and whether the values agree.

    python benchmarks/rollout_batches.py PLANTED_DIR [--adapter DEMO_OUT/forget-adapter] [--repeats 2]

PLANTED_DIR is the demo's planted model (`~/.cache/icu-peft/planted-*`, or `$ICU_PEFT_CACHE/planted-*`); with
`--adapter` (a demo's forget adapter) the texts are scored through it, as the request's last confirmation
and the demo's after-table do. Prints one JSON line per text set: medians, their ratio, and `same_values`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("planted")
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--el-n", type=int, default=10)
    args = ap.parse_args()

    import icu_peft.metrics as metrics
    from icu_peft.demo.records import make_corpus
    from icu_peft.demo.run import DemoOptions
    from icu_peft.dequant import dense_weights
    from icu_peft.models import load_base_model, load_tokenizer

    opts = DemoOptions()
    corpus = make_corpus(opts.num_people, opts.num_unseen, opts.forget_fraction, opts.seed)
    tok = load_tokenizer(args.planted)
    base = load_base_model(args.planted, quantize=True)
    model = base
    if args.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    shrinking, keep_all = metrics._drop_done, (lambda want, t: None)
    sets = {"forgotten people": corpus.forget_texts, "kept people": corpus.retain_texts}
    with dense_weights(base, 2000, next(base.parameters()).device):
        for name, texts in sets.items():
            ids = [torch.tensor(tok(t)["input_ids"]) for t in texts]
            times, values = {"all_rows": [], "shrinking": []}, {}
            for _ in range(args.repeats):
                for label, rule in (("all_rows", keep_all), ("shrinking", shrinking)):
                    metrics._drop_done = rule
                    try:
                        t0 = time.perf_counter()
                        values[label] = metrics.extraction_likelihood(model, ids, args.el_n, tok.pad_token_id)
                        times[label].append(time.perf_counter() - t0)
                    finally:
                        metrics._drop_done = shrinking
            med = {k: statistics.median(v) for k, v in times.items()}
            print(json.dumps({"set": name, "texts": len(ids), "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
                              "ratio": round(med["shrinking"] / med["all_rows"], 3),
                              "same_values": values["all_rows"] == values["shrinking"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
