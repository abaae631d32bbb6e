"""`icu-peft ledger`: every forget request of one served base, and the one consolidated adapter that serves them."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("ledger", help="a forget ledger: requests kept one by one, served as one consolidated adapter",
                       description="add REQUEST_ADAPTER, revoke ID, status, consolidate (train the served adapter on "
                                   "the active requests' texts, warm-started from the last one). docs/LIFECYCLE.md.")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    a = verbs.add_parser("add", help="check a forget adapter and add it to the ledger (created if missing)")
    a.add_argument("ledger", metavar="LEDGER")
    a.add_argument("adapter", metavar="ADAPTER")
    r = verbs.add_parser("revoke", help="revoke one request (its adapter is deleted; re-consolidate to stop serving it)")
    r.add_argument("ledger", metavar="LEDGER")
    r.add_argument("request_id", metavar="ID")
    s = verbs.add_parser("status", help="active requests and what the served adapter covers (exit 3 when stale)")
    s.add_argument("ledger", metavar="LEDGER")
    c = verbs.add_parser("consolidate", help="train the served adapter on the union of the active requests")
    c.add_argument("ledger", metavar="LEDGER")
    c.add_argument("--model", required=True, help="the ledger's base model")
    c.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    c.add_argument("--forget", required=True, help="every active request's texts (checked against their manifests)")
    c.add_argument("--retain", help="retain pool")
    c.add_argument("--unseen", help="never-seen text of the same kind")
    c.add_argument("--restore", help="texts that must come back (a revoked request's): held to the base as retain "
                                     "anchors in this consolidation")
    c.add_argument("--config", help="recipe YAML (ICUConfig fields) for the consolidation")
    c.add_argument("--from-zero", action="store_true",
                   help="train the served adapter from zero, not warm-started from the last one (docs/LIFECYCLE.md)")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import ledger as L

    if args.verb == "add":
        e = L.add_request(args.ledger, args.adapter)
        print(f"added request {e['request_id']} ({e['samples']} samples) to {args.ledger}; "
              f"the served adapter does not cover it until `icu-peft ledger consolidate`")
        return 0
    if args.verb == "revoke":
        L.revoke_request(args.ledger, args.request_id)
        print(f"revoked {args.request_id}: its adapter is deleted; the served adapter still covers it until "
              f"`icu-peft ledger consolidate`")
        return 0
    if args.verb == "status":
        st = L.status(args.ledger)
        c = st["consolidated"]
        print(f"active requests: {len(st['active'])}   revoked: {len(st['revoked'])}")
        if c:
            print(f"served adapter: {c['path']}/ ({c['status']}, {c['forgotten']} of {c['samples']} samples, rank "
                  f"{c['rank']}, covers {len(c['covers'])} requests, {c['at']})")
        else:
            print("served adapter: none yet (`icu-peft ledger consolidate`)")
        if st["not_covered"]:
            print(f"  not covered (added since): {', '.join(st['not_covered'])}")
        if st["revoked_but_served"]:
            print(f"  revoked but still served: {', '.join(st['revoked_but_served'])}")
        print("up to date" if st["up_to_date"] else "STALE: run `icu-peft ledger consolidate`")
        return 0 if st["up_to_date"] else 3
    from ..config import ICUConfig
    from ..data import read_texts
    from ..unlearner import STATUS_EXIT_CODES

    over = dict(model=args.model, gguf_file=args.gguf_file, progress=False if args.no_progress else None)
    cfg = (ICUConfig.from_yaml(args.config, **over) if args.config
           else ICUConfig(**{k: v for k, v in over.items() if v is not None}))
    texts = read_texts(args.forget, cfg.text_field)
    retain = read_texts(args.retain, cfg.text_field) if args.retain else None
    unseen = read_texts(args.unseen, cfg.text_field) if args.unseen else None
    restore = read_texts(args.restore, cfg.text_field) if args.restore else None
    res = L.consolidate(args.ledger, cfg, texts, retain, unseen, restore=restore, warm=not args.from_zero)
    r = res.report
    print(f"consolidated {len(L.status(args.ledger)['active'])} requests into {res.output_dir}: {r['status']}, "
          f"{r['forget']['forgotten']} of {r['forget']['count']} samples forgotten after {r['steps']} steps")
    return STATUS_EXIT_CODES.get(r["status"], 1)
