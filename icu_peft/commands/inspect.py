"""`icu-peft inspect`: a readable summary of a forget adapter, combined adapter or merged model."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a forget adapter or merged model (and check its files)")
    p.add_argument("dir", metavar="DIR", help="adapter, combined adapter or merged model directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _failed(d: dict) -> bool:
    return d.get("integrity") != "ok" or any(_failed(p) for p in d.get("parts") or [])


def run(args) -> int:
    from ..lifecycle import describe, format_description
    from ._common import print_json

    d = describe(args.dir)
    if args.json:
        print_json(d)
    else:
        print(format_description(d))
    return 1 if _failed(d) else 0
