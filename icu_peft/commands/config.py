"""`icu-peft config`: list every ICUConfig field with its default and help, or check a recipe."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("config", help="show every config field, or validate a recipe YAML")
    p.add_argument("recipe", nargs="?", help="a recipe YAML to load and validate")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import ICUConfig, help_table

    if args.recipe:
        cfg = ICUConfig.from_yaml(args.recipe)
        for k, v in cfg.to_dict().items():
            print(f"{k}: {v!r}")
        return 0
    print(help_table())
    return 0
