"""Why Min-K%++ finds forgotten samples that a loss attack cannot: the shape of each next-token distribution.

For one validation-matrix scenario whose adapter exists in WORKDIR (run benchmarks/validation_matrix.py
with --workdir WORKDIR first), score the forget, never-seen and held-out never-seen texts under the base
with the adapter and print, per set, the mean of: the true token's log-probability, the next-token
entropy, the Min-K%++ score of the lowest 20% of tokens (Zhang et al. 2024: (log p(x_t) - mu_t) / sigma_t,
mu and sigma of log p under the model's own distribution), and that z-score's mean over all tokens.

    OMP_NUM_THREADS=1 python benchmarks/distribution_shape.py --workdir W --scenario code [--method icu] [--with-base]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def shape_stats(model, tok, texts, k_share: float = 0.2) -> dict:
    rows = []
    for t in texts:
        ids = torch.tensor(tok(t)["input_ids"])[None]
        with torch.no_grad():
            lp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        true = lp.gather(-1, ids[0, 1:, None])[:, 0]
        p = lp.exp()
        mu = (p * lp).sum(-1)
        sd = ((p * lp * lp).sum(-1) - mu ** 2).clamp(min=1e-8).sqrt()
        z = (true - mu) / sd
        k = max(1, int(k_share * len(z)))
        rows.append([float(true.mean()), float(-mu.mean()), float(z.sort().values[:k].mean()), float(z.mean())])
    m = torch.tensor(rows).mean(0).tolist()
    return dict(zip(("true_logp", "entropy", "min_k_pp_20", "z_mean"), (round(x, 3) for x in m)))


def main() -> int:
    from peft import PeftModel

    from icu_peft.models import load_base_model, load_tokenizer
    from validation_matrix import build

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--method", default="icu")
    ap.add_argument("--with-base", action="store_true", help="also print each set's figures under the base alone")
    args = ap.parse_args()
    torch.set_num_threads(1)
    wd = Path(args.workdir)
    model_dir, _, fg, _, un, gen, _ = build(args.scenario, wd)
    adapter = wd / f"{args.scenario}_{args.method}_adapter"
    if not adapter.is_dir():
        print(f"no adapter at {adapter}: run validation_matrix.py --workdir {wd} --scenarios {args.scenario} first",
              file=sys.stderr)
        return 1
    tok = load_tokenizer(str(model_dir))
    model = PeftModel.from_pretrained(load_base_model(str(model_dir), quantize=True), str(adapter)).eval()
    for name, texts in (("forget", fg), ("never-seen (--unseen)", un), ("never-seen, held out", gen)):
        print(f"{name:24s}", shape_stats(model, tok, texts))
    if args.with_base:  # the same sets under the base alone: what the adapter changed on text it never trained on
        with model.disable_adapter():
            for name, texts in (("base: forget", fg), ("base: never-seen", un), ("base: held out", gen)):
                print(f"{name:24s}", shape_stats(model, tok, texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
