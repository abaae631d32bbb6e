"""`icu-peft forget`: run one ICU forget request into a LoRA forget adapter."""

from __future__ import annotations

import logging

logger = logging.getLogger("icu_peft")


def add_parser(sub) -> None:
    p = sub.add_parser("forget", help="train a forget adapter for a forget request (ICU)")
    p.add_argument("--model", help="base model: local directory or hub id (or `model:` in --config)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--forget", help="forget set: .jsonl (field text), .csv (column text) or .txt (one per line)")
    p.add_argument("--out", help="output directory for the forget adapter")
    p.add_argument("--retain", help="retain pool (same formats): neighbours for CLE")
    p.add_argument("--unseen", help="text of the same kind the model never saw: sets the 'forgotten' thresholds")
    p.add_argument("--config", help="recipe YAML (ICUConfig fields; a `data:` section may name the files)")
    p.add_argument("--no-quantize", action="store_true", help="keep the base in full precision")
    p.add_argument("--max-epochs", type=int, help="epoch cap")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, help="learning rate")
    p.add_argument("--criterion", choices=["ma_el", "bleu"], help="IUR criterion")
    p.add_argument("--method", choices=["icu", "icu_paper", "ga", "graddiff", "npo"],
                   help="preset: icu (default; selective), icu_paper (ICU's reference objective), or a baseline")
    p.add_argument("--nll-target", metavar="off|unseen|NATS",
                   help="after training, scale the adapter towards the forget set's loss matching the unseen text's "
                        "(or this many nats) while it stays forgotten: over-forgotten text is itself a membership signal")
    p.add_argument("--request-id", help="identifier of the request (default: a UUID)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--on-top-of", action="append", default=[], metavar="ADAPTER",
                   help="sequential training: train with these forget adapters active and frozen (repeatable); "
                        "the new adapter then assumes them and is not independently revocable")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters import check_output_dir
    from ..config import ICUConfig, read_recipe
    from ..data import read_texts
    from ..errors import InputError
    from ..unlearner import forget

    overrides = dict(method=args.method, model=args.model, gguf_file=args.gguf_file, max_epochs=args.max_epochs, seed=args.seed,
                     learning_rate=args.learning_rate, criterion=args.criterion, request_id=args.request_id,
                     nll_target=args.nll_target)
    if args.no_quantize:
        overrides["quantize"] = False
    if args.no_progress:
        overrides["progress"] = False
    data = {}
    if args.config:
        cfg = ICUConfig.from_yaml(args.config, **overrides)
        data = read_recipe(args.config)[1]
    else:
        cfg = ICUConfig.for_method(args.method or "icu", **{k: v for k, v in overrides.items() if v is not None})
    if not cfg.model:
        raise InputError("no base model: give --model or `model:` in --config")
    forget_path = args.forget or data.get("forget")
    if not forget_path:
        raise InputError("no forget set: give --forget FILE")
    if not args.out:
        raise InputError("no output directory: give --out DIR")
    check_output_dir(args.out, args.overwrite)  # before any heavy work
    forget_texts = read_texts(forget_path, cfg.text_field)
    retain_path = args.retain or data.get("retain")
    unseen_path = args.unseen or data.get("unseen")
    retain = read_texts(retain_path, cfg.text_field) if retain_path else None
    unseen = read_texts(unseen_path, cfg.text_field) if unseen_path else None

    base_model = None
    if args.on_top_of:
        from ..lifecycle import stack_adapters
        from ..models import load_base_model

        base = load_base_model(cfg.model, cfg.quantize, cfg.compute_dtype, cfg.gguf_file, cfg.trust_remote_code)
        base_model = stack_adapters(base, args.on_top_of)  # integrity- and base-checked
    result = forget(cfg, forget_texts, retain, unseen, output_dir=args.out, overwrite=args.overwrite,
                    base_model=base_model)
    r = result.report
    if result.output_dir is not None:
        print(f"forget adapter written to {result.output_dir}")
        print(f"  status: {r['status']}; {r['forget']['forgotten']} of {r['forget']['count']} samples forgotten "
              f"after {r['epochs']} epochs ({r['wall_time_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB)")
        print(f"  forget MA {r['forget']['before']['ma']:.3f} -> {r['forget']['after']['ma']:.3f}, "
              f"EL{cfg.el_n} {r['forget']['before']['el']:.3f} -> {r['forget']['after']['el']:.3f} "
              f"(thresholds {r['thresholds']['ma']:.3f} / {r['thresholds']['el']:.3f}, {r['thresholds']['source']})")
        if r["retain"]["before"]:
            print(f"  retain MA {r['retain']['before']['ma']:.3f} -> {r['retain']['after']['ma']:.3f}")
    return 0 if r["status"] != "nan_restored" else 1
