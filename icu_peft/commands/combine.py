"""`icu-peft combine`: several forget adapters -> one LoRA adapter equal to their stack."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("combine", help="combine forget adapters into one (rank concatenation, exact)")
    p.add_argument("--adapter", action="append", default=[], required=True, metavar="DIR",
                   help="forget adapter to include; repeat for several")
    p.add_argument("--out", required=True, help="output directory for the combined adapter")
    p.add_argument("--request-id", default=None, help="identifier of the combined adapter (default: derived from its parts)")
    p.add_argument("--force", action="store_true", help="combine adapters trained on different bases")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lifecycle import combine_adapters

    m = combine_adapters(args.adapter, args.out, request_id=args.request_id, force=args.force,
                         overwrite=args.overwrite)
    parts = ", ".join(c["request_id"] for c in m["components"])
    print(f"combined adapter {m['request_id']} written to {args.out}: rank {m['lora']['r']} from {parts}")
    return 0
