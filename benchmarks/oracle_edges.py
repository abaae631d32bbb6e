"""Would text the model never saw pass the "forgotten" test? Score each validation-matrix scenario's
forget set under its oracle (the same shape trained without the forget set) and count the samples a
per-sample MA / EL_n edge (the highest never-seen value, MA plus one token) would reject, with and
without the chance allowance of refine.with_chance_outliers.

    OMP_NUM_THREADS=2 python benchmarks/oracle_edges.py --workdir W [SCENARIO ...]

W is the validation matrix's work directory (models are built there if missing). Nothing is trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from validation_matrix import DEFAULT_SCENARIOS, build  # noqa: E402

from icu_peft.config import ICUConfig  # noqa: E402
from icu_peft.data import new_salt, tokenize_texts  # noqa: E402
from icu_peft.metrics import score_samples  # noqa: E402
from icu_peft.calibrate import Band  # noqa: E402
from icu_peft.models import load_base_model, load_tokenizer  # noqa: E402
from icu_peft.refine import Thresholds, forgotten_mask  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", default=list(DEFAULT_SCENARIOS))
    ap.add_argument("--workdir", required=True)
    args = ap.parse_args()
    cfg = ICUConfig()
    print("| scenario | never-seen EL_n edge | forget samples | outside the NLL band | inside it but over the MA / EL_n "
          "edge | of those, still rejected with the chance allowance |")
    print("|---|---|---|---|---|---|")
    for name in args.scenarios:
        _, oracle, fg, _, un, _, _ = build(name, Path(args.workdir))
        tok, model = load_tokenizer(str(oracle)), load_base_model(str(oracle))
        salt = new_salt()

        def scores(texts, kind):
            tset = tokenize_texts(texts, tok, cfg.max_length, salt, min_tokens=cfg.el_n + 1, name=kind)
            return tset, score_samples(model, tset.input_ids, tok.pad_token_id, cfg.el_n, cfg.el_start,
                                       cfg.score_batch_size)

        uset, u = scores(un, "unseen")
        _, f = scores(fg, "forget")
        band = Band.from_scores(u.nll, u.ma, u.el, cfg.band_quantile, cfg.settle_quantile, uset.lengths)
        m = u.mean()
        t = Thresholds(ma=band.ma_hi, el=band.el_hi, source="unseen", unseen_count=len(u.ma),
                       nll_lo=band.nll_lo, nll_hi=band.nll_hi, ma_mean=m["ma"], el_mean=m["el"])
        inside = [band.nll_lo <= x <= band.nll_hi for x in f.nll]
        over = [i for i, (ma, el) in enumerate(zip(f.ma, f.el)) if inside[i] and (ma > t.ma or el > t.el)]
        flags = forgotten_mask(f, t)
        print(f"| {name} | {t.el:.4f} | {len(f.ma)} | {inside.count(False)} | {len(over)} | "
              f"{sum(not flags[i] for i in over)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
