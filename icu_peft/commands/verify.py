"""`icu-peft verify`: re-score a forget set under a model and adapter stack (the audit).

Exit 0 when every sample counts as forgotten, 1 otherwise (2 for bad input).
"""

from __future__ import annotations

from ._common import add_model_args, load_model_with_adapters, print_json


def add_parser(sub) -> None:
    p = sub.add_parser("verify", help="check that every sample of a forget set is forgotten (exit 0) or not (exit 1)")
    add_model_args(p)
    p.add_argument("--forget", required=True, help="forget set: .jsonl (field text), .csv (column text) or .txt")
    p.add_argument("--unseen", help="text the model never saw: thresholds for samples no adapter manifest lists")
    p.add_argument("--ma-threshold", type=float, help="MA threshold for every sample (overrides the manifests)")
    p.add_argument("--el-threshold", type=float, help="EL threshold for every sample (overrides the manifests)")
    p.add_argument("--text-field", default="text", help="field (jsonl) or column (csv) holding the text")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per scoring batch")
    p.add_argument("--id-key", action="append", default=[], metavar="FILE",
                   help="sample-id key file the operator handed over (default: this machine's key directory, "
                        "$ICU_PEFT_ID_KEYS or ~/.config/icu-peft/id-keys): matches texts to the request that lists them")
    p.add_argument("--public-key", metavar="FILE",
                   help="also require a valid Ed25519 signature (icu-peft sign) by this key on every --adapter and on "
                        "a merged --model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import read_texts
    from ..errors import InputError
    from ..lifecycle import collect_leaves, format_verify_line, verify_forget_set

    if (args.ma_threshold is None) != (args.el_threshold is None):
        raise InputError("give both --ma-threshold and --el-threshold, or neither")
    if args.batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    texts = read_texts(args.forget, args.text_field)
    unseen = read_texts(args.unseen, args.text_field) if args.unseen else None
    signatures = _check_signatures(args) if args.public_key else None
    model, tok = load_model_with_adapters(args)
    leaves = collect_leaves(model)
    from ..idkeys import read_key_file

    result = verify_forget_set(model, tok, texts, leaves, args.ma_threshold, args.el_threshold, unseen,
                               args.batch_size, id_keys=[read_key_file(k) for k in args.id_key])
    s = result["summary"]
    if args.json:
        print_json({"model": args.model, "adapters": list(args.adapter), "signatures": signatures, **result})
    else:
        for where, sig in (signatures or {}).items():
            print(f"signature ok: {where} (key id {sig['signed_by'][:16]})")
        for r in result["samples"]:
            print(format_verify_line(r))
        print(f"{s['verdict']}: {s['forgotten']} of {s['samples']} samples forgotten "
              f"(mean MA {s['mean_ma']:.3f}, mean EL {s['mean_el']:.3f}; {s['matched_to_manifest']} matched to "
              f"a manifest; requests: {', '.join(s['requests']) or 'none'})")
    return 0 if s["forgotten"] == s["samples"] else 1


def _check_signatures(args) -> dict:
    """Every --adapter (and a merged --model) must carry a valid signature by --public-key."""
    from pathlib import Path

    from ..adapters import MANIFEST_NAME
    from ..errors import InputError
    from ..signing import verify_signature

    targets = list(args.adapter)
    if Path(args.model, MANIFEST_NAME).is_file():
        targets.insert(0, args.model)
    if not targets:
        raise InputError("--public-key checks the signatures of --adapter directories or a merged --model; none given")
    return {t: verify_signature(t, args.public_key) for t in targets}
