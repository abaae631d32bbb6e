"""`icu-peft revoke`: take requests back out of a merged model or a combined adapter."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("revoke", help="remove forget requests from a merged model (or combined adapter)")
    p.add_argument("--model", required=True, metavar="DIR", help="merged model directory, or a combined adapter")
    p.add_argument("--adapter", action="append", default=[], required=True, metavar="DIR_OR_ID",
                   help="adapter directory or request id to revoke; repeat for several")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", default=None,
                   help="pristine base model, if it moved from the path recorded in the merged manifest")
    p.add_argument("--force", action="store_true", help="accept a base whose weight files differ from the recorded ones")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..adapters import leaf_manifests, manifest_kind
    from ..lifecycle import revoke

    m = revoke(args.model, args.adapter, args.out, base=args.base, force=args.force, overwrite=args.overwrite,
               trust_remote_code=args.trust_remote_code)
    left = [str(x.get("request_id")) for _, x in leaf_manifests(args.out, m)]
    what = {"merged": "merged model", "combined": "combined adapter", "adapter": "forget adapter"}[manifest_kind(m)]
    print(f"{what} written to {args.out}; requests still applied: {', '.join(left) or 'none (pristine base)'}")
    return 0
