"""`icu-peft demo`: plant fictitious customer records into SmolLM2-135M, forget some, show before/after."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the whole story on a real model: plant records, forget some, show the table")
    p.add_argument("--quick", action="store_true", help="smaller run (fewer people and epochs): a smoke test")
    p.add_argument("--people", type=int, help="number of fictitious people planted (default 20; quick 12)")
    p.add_argument("--unseen", type=int, help="people of the same kind never planted: the 'forgotten' level")
    p.add_argument("--forget-fraction", type=float, help="share of the people who file an erasure request (0.1; quick 0.17)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fictitious people")
    p.add_argument("--out", default="icu-peft-demo", help="where the forget adapter and the report go (./icu-peft-demo)")
    p.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a previous demo's output")
    p.add_argument("--max-epochs", type=int, help="ICU epoch cap")
    p.add_argument("--lr", dest="learning_rate", type=float, help="ICU learning rate")
    p.add_argument("--cache-dir", help="where planted models are cached (default: $ICU_PEFT_CACHE, else $XDG_CACHE_HOME/icu-peft, "
                        "else ~/.cache/icu-peft)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..demo.run import DemoOptions, run_demo
    from ..demo.smollm2 import find_smollm2

    find_smollm2()  # a missing model package is a one-line error before any work
    kw = {"seed": args.seed, "output_dir": Path(args.out), "overwrite": args.overwrite,
          "progress": not args.no_progress, "cache_dir": Path(args.cache_dir) if args.cache_dir else None}
    for name, value in (("num_people", args.people), ("num_unseen", args.unseen),
                        ("forget_fraction", args.forget_fraction)):
        if value is not None:
            kw[name] = value
    opts = DemoOptions.quick(**kw) if args.quick else DemoOptions(**kw)
    icu = {k: v for k, v in (("max_epochs", args.max_epochs), ("learning_rate", args.learning_rate)) if v is not None}
    opts.icu = {**opts.icu, **icu}
    run_demo(opts)
    return 0
