"""`icu-peft codebook {train,forget,stack,revoke,inspect,verify,eval}`: the CodeUnlearn method."""

from __future__ import annotations

import argparse
from pathlib import Path

PARTIAL_EXIT = 3  # as `icu-peft forget`: the output is written and marked partial
FORGET_EXIT_HELP = ("exit status: 0 the topic's name-dependent predictions are gone (select auto; with select test, "
                    "a mask was written); 3 not forgotten in full: the mask is written and its status says why "
                    "(partial: some are left; not_name_bound: there were none, nothing a mask of the topic words "
                    "can change); 2 bad input")


def _model_args(p: argparse.ArgumentParser, force: bool = True) -> None:
    p.add_argument("--model", required=True, help="base model: local directory or hub id")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--no-quantize", action="store_true", help="keep the base in full precision (default: 4-bit NF4)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    if force:
        p.add_argument("--force", action="store_true",
                       help="accept a codebook/mask made on a different base (file hashes are always checked)")


def add_parser(sub) -> None:
    p = sub.add_parser("codebook", help="CodeUnlearn: an SAE or codebook bottleneck and zero-shot topic forgetting")
    cs = p.add_subparsers(dest="codebook_command", metavar="ACTION")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    t = cs.add_parser("train", help="train the bottleneck (an SAE by default, or a codebook) once on general text (base frozen)")
    _model_args(t, force=False)
    t.add_argument("--data", required=True, help="general training text: .jsonl (field text), .csv (column text) or .txt")
    t.add_argument("--eval-data", help="held-out text for the perplexity cost (default: a share of --data)")
    t.add_argument("--out", required=True, help="output directory for the codebook")
    t.add_argument("--kind", choices=["sae", "codes"],
                   help="sae (default): a top-k sparse autoencoder read beside the site (no perplexity cost, no "
                        "recovery LoRA); codes: a codebook replaces the site's output")
    t.add_argument("--layer", type=int, help="decoder layer (0-based; negative from the end; default: a tenth of the way up)")
    t.add_argument("--layers", help="several decoder layers, comma-separated (one codebook / SAE each); overrides --layer")
    t.add_argument("--sae-tokens", type=int, help="SAE: hidden states per layer to train on")
    t.add_argument("--site", choices=["residual", "mlp", "attention"],
                   help="what is snapped: the layer's whole residual output (default), or only its MLP or self-attention output")
    t.add_argument("--num-codes", type=int, help="codes / SAE features per layer (default: 2048 for an SAE, 1024 codes)")
    t.add_argument("--k", type=int, help="top-k codes per hidden state")
    t.add_argument("--similarity", choices=["cosine", "inner"], help="code ranking")
    t.add_argument("--combine", choices=["mean", "sum"], help="how the k codes are combined")
    t.add_argument("--steps", type=int, help="optimisation steps (default: 1500 for an SAE, 300 for codes)")
    t.add_argument("--batch-size", type=int, help="windows per step")
    t.add_argument("--max-length", type=int, help="tokens per training window")
    t.add_argument("--lr", dest="learning_rate", type=float, help="learning rate (default: 1e-3 for an SAE, 0.05 for codes)")
    t.add_argument("--recon-weight", type=float, help="weight of the reconstruction loss")
    t.add_argument("--kmeans-tokens", type=int, help="hidden states for the k-means init")
    t.add_argument("--dead-code-interval", type=int, help="re-seed unused codes every N steps (0: never)")
    t.add_argument("--recovery-lora-r", type=int,
                   help="codes only: rank of a LoRA trained jointly with the codes in the layers after the bottleneck "
                        "(default 8; 0: none)")
    t.add_argument("--recovery-lora-alpha", type=int, help="LoRA alpha of the recovery adapter")
    t.add_argument("--recovery-lr", dest="recovery_learning_rate", type=float, help="learning rate of the recovery LoRA")
    t.add_argument("--seed", type=int, help="random seed")
    t.add_argument("--text-field", default="text", help="jsonl field / csv column holding the text")
    t.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run_train)

    f = cs.add_parser("forget", help="zero-shot: mask the codes a topic uses (no gradient step)",
                       epilog=FORGET_EXIT_HELP)
    _model_args(f)
    f.add_argument("--codebook", required=True, help="codebook directory (from `codebook train`)")
    f.add_argument("--topic", required=True, help="topic text to forget (.jsonl/.csv/.txt)")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--contrast", help="contrast text: the topic text with the topic words swapped out")
    g.add_argument("--topic-words", help="comma-separated topic words; the contrast is built by swapping them for neutral words "
                                        "(a capitalised word, a name: for an invented name)")
    f.add_argument("--keep", help="text that must stay (.jsonl/.csv/.txt), e.g. other topics of the same form: "
                                   "a code that costs it a correct prediction is not used (select auto)")
    f.add_argument("--out", required=True, help="output directory for the code mask")
    f.add_argument("--select", choices=["auto", "test"],
                   help="auto (default): add the candidate codes one at a time until the topic's name-dependent "
                        "predictions are gone; test: every code passing --max-p")
    f.add_argument("--pool-p", type=float, help="auto: p-value under which a code is a candidate (default 0.2)")
    f.add_argument("--min-ratio", type=float, help="minimum topic/contrast frequency ratio")
    f.add_argument("--max-p", type=float, help="test: maximum chi-squared p-value")
    f.add_argument("--bonferroni", action="store_true",
                   help="divide --max-p by the number of codes (strict: needs a large topic text)")
    f.add_argument("--min-count", type=int, help="minimum topic positions a code must be active at")
    f.add_argument("--max-codes", type=int, help="keep at most this many codes (0: no cap)")
    f.add_argument("--mode", choices=["auto", "zero", "negate", "block"],
                   help="zero (masked codes / SAE features add nothing), negate (they add their opposite), block "
                        "(next-best codes replace them; codebooks only), or auto (default): zero, and with --keep also "
                        "negate where zero leaves something, whichever leaves less")
    f.add_argument("--positions", choices=["all", "answers", "both"],
                   help="count codes at every topic position (default), only where the topic words make the next "
                        "token likelier (the answers), or both")
    f.add_argument("--answer-margin", type=float, help="nats by which the topic must beat the contrast at an answer position")
    f.add_argument("--max-length", type=int, help="tokens per text")
    f.add_argument("--request-id", help="identifier of the request (default: a UUID)")
    f.add_argument("--text-field", default="text", help="jsonl field / csv column holding the text")
    f.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=run_forget)

    s = cs.add_parser("stack", help="one mask holding the union of several masks' requests")
    s.add_argument("masks", nargs="+", metavar="MASK_DIR")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--mode", choices=["zero", "negate", "block"], help="override when the masks disagree")
    s.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    s.set_defaults(func=run_stack)

    r = cs.add_parser("revoke", help="a mask without some of its requests")
    r.add_argument("mask", metavar="MASK_DIR")
    r.add_argument("--request-id", action="append", required=True, help="request to remove; repeat for several")
    r.add_argument("--out", required=True, help="output directory")
    r.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    r.set_defaults(func=run_revoke)

    i = cs.add_parser("inspect", help="summarise codebook / mask directories as JSON")
    i.add_argument("dirs", nargs="+", metavar="DIR")
    i.set_defaults(func=run_inspect)

    v = cs.add_parser("verify", help="check codebook / mask directories (hashes, consistency, base, codebook)")
    v.add_argument("dirs", nargs="+", metavar="DIR")
    v.add_argument("--model", help="also check that they belong to this base model")
    v.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    v.add_argument("--codebook", help="also check that the masks belong to this codebook")
    v.set_defaults(func=run_verify)

    e = cs.add_parser("eval", help="perplexity / next-token accuracy with a codebook and masks")
    _model_args(e)
    e.add_argument("--codebook", help="codebook directory (omit to score the bare base)")
    e.add_argument("--mask", action="append", default=[], metavar="DIR", help="code mask; repeat to stack")
    e.add_argument("--mode", choices=["zero", "negate", "block"], help="override the masks' mode")
    e.add_argument("--data", action="append", required=True, metavar="[NAME=]FILE", help="text to score; repeat for several sets")
    e.add_argument("--max-length", type=int, default=128, help="tokens per window")
    e.add_argument("--text-field", default="text", help="jsonl field / csv column holding the text")
    e.set_defaults(func=run_eval)


def _load(args):
    from ..models import load_base_model, load_tokenizer

    tok = load_tokenizer(args.model, args.gguf_file, args.trust_remote_code)
    model = load_base_model(args.model, quantize=not args.no_quantize, gguf_file=args.gguf_file,
                            trust_remote_code=args.trust_remote_code)
    return model, tok


def run_train(args) -> int:
    from ..adapters import check_output_dir
    from ..errors import InputError
    from ..codebook import CodebookConfig, train_codebook
    from ..data import read_texts

    keys = ("kind", "layer", "site", "sae_tokens", "num_codes", "k", "similarity", "combine", "steps", "batch_size", "max_length", "learning_rate",
            "recon_weight", "kmeans_tokens", "dead_code_interval", "seed", "recovery_lora_r", "recovery_lora_alpha",
            "recovery_learning_rate")
    over = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.layers:
        try:
            over["layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise InputError(f"--layers takes comma-separated integers, not {args.layers!r}") from None
    if args.no_progress:
        over["progress"] = False
    cfg = CodebookConfig(**over)
    check_output_dir(args.out, args.overwrite, inputs=[args.model])
    texts = read_texts(args.data, args.text_field)
    eval_texts = read_texts(args.eval_data, args.text_field) if args.eval_data else None
    model, tok = _load(args)
    res = train_codebook(cfg, texts, model, tok, eval_texts, args.out, args.overwrite, base_name=args.model)
    p = res.manifest["perplexity"]
    rec = f", recovery LoRA r={cfg.recovery_lora_r}" if cfg.recovery_lora_r else ""
    where = ",".join(str(i) for i in res.layer_indices)
    what = "SAE features" if cfg.kind == "sae" else "codes"
    print(f"{'SAE' if cfg.kind == 'sae' else 'codebook'} written to {res.output_dir} (layer{'s' if len(res.layer_indices) > 1 else ''} "
          f"{where} {cfg.site}, {cfg.num_codes} {what} each, top-{cfg.k}{rec}, {res.manifest['wall_time_s']:.1f} s)")
    if cfg.kind == "sae":
        for st in res.manifest["training"]["sae"]:
            print(f"  layer {st['layer']}: fraction of variance unexplained {st['fvu_held_out']:.3f} on "
                  f"{st['held_out_states']} held-out states; {st['features_used_held_out']} features used "
                  f"(the model is the base until a mask removes features)")
    elif p["base"] and p["codebook"]:
        print(f"  perplexity on {p['eval_windows']} eval windows: base {p['base']['ppl']:.3f} -> with bottleneck "
              f"{p['codebook']['ppl']:.3f} (k-means init {p['kmeans_init']['ppl']:.3f}); "
              f"{p['codes_used_on_eval']} codes used")
    return 0


def run_forget(args) -> int:
    from ..adapters import check_output_dir
    from ..codebook import CodeForgetConfig, forget_topic
    from ..data import read_texts

    keys = ("min_ratio", "max_p", "min_count", "max_codes", "mode", "positions", "answer_margin", "max_length",
            "request_id", "select", "pool_p")
    over = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.bonferroni:
        over["bonferroni"] = True
    if args.no_progress:
        over["progress"] = False
    cfg = CodeForgetConfig(**over)
    check_output_dir(args.out, args.overwrite, inputs=[args.model, args.codebook])
    topic = read_texts(args.topic, args.text_field)
    contrast = read_texts(args.contrast, args.text_field) if args.contrast else None
    keep = read_texts(args.keep, args.text_field) if args.keep else None
    words = [w for w in args.topic_words.split(",") if w.strip()] if args.topic_words else None
    model, tok = _load(args)
    res = forget_topic(cfg, model, tok, args.codebook, topic, contrast, words, args.out, args.overwrite,
                       force=args.force, base_name=args.model, keep_texts=keep)
    req = res.manifest["requests"][0]
    print(f"code mask written to {res.output_dir}: {len(res.codes)} codes ({res.manifest['mode']}) selected from "
          f"{res.stats['codes_active_on_topic']} active on {req['topic']['count']} topic texts "
          f"in {req['wall_time_s']:.1f} s")
    search = res.stats.get("search")  # counts for the operator's terminal; the mask file holds none
    if search is None:
        if not res.codes:
            print("  warning: no code passed the thresholds; this mask changes nothing (lower --min-ratio / raise --max-p)")
        return 0
    if req["status"] == "not_name_bound":
        print("not name-bound: the model predicts nothing of the topic text that it does not also predict with the "
              "topic words swapped out, so no mask of them changes what it says (mask written, empty); "
              "`icu-peft forget` trains an adapter for such text")
        return PARTIAL_EXIT
    print(f"  name-dependent predictions: {search['dependent_predictions']} before, {search['left']} left; "
          f"{search['candidates_tried']} candidate codes tried, {search['skipped_for_damage']} skipped for the "
          f"predictions they took from the contrast{' and --keep' if keep else ''}")
    if req["status"] == "partial":
        hint = ("`icu-peft forget` (an adapter) for what is left" if keep else
                "--keep with text of other topics to protect (the search then also tries --mode negate), "
                "or `icu-peft forget` (an adapter) for what is left")
        print(f"partial: {search['left']} of {search['dependent_predictions']} name-dependent predictions are left "
              f"(mask written, marked partial); try {hint}")
        return PARTIAL_EXIT
    return 0


def run_stack(args) -> int:
    from ..codebook import stack_masks

    m = stack_masks(args.masks, args.out, args.mode, args.overwrite)
    print(f"stacked {len(m['requests'])} requests into {args.out}: {len(m['codes'])} codes ({m['mode']})")
    return 0


def run_revoke(args) -> int:
    from ..codebook import revoke_mask

    m = revoke_mask(args.mask, args.request_id, args.out, args.overwrite)
    print(f"revoked {', '.join(args.request_id)}: {args.out} keeps {len(m['requests'])} requests, {len(m['codes'])} codes")
    return 0


def run_inspect(args) -> int:
    from ..codebook import describe
    from ._common import print_json

    print_json([describe(d) for d in args.dirs])
    return 0


def run_verify(args) -> int:
    from ..codebook import read_code_mask, read_codebook, verify_dir
    from ..codebook.api import check_mask_for

    fp = None
    if args.model:
        from ..models import base_fingerprint, load_base_model

        fp = base_fingerprint(load_base_model(args.model, quantize=False, gguf_file=args.gguf_file))
    cb = read_codebook(args.codebook) if args.codebook else None
    for d in args.dirs:
        m = verify_dir(d, fp)
        if cb is not None and m.get("kind") == "code_mask":
            check_mask_for(read_code_mask(d), cb)
        print(f"{d}: OK ({m.get('kind')}, {len(m['files'])} files)")
    return 0


def run_eval(args) -> int:
    from ..codebook import load_codebook_model
    from ..codebook.evaluate import lm_scores, windows
    from ..data import read_texts
    from ..errors import InputError
    from ._common import print_json

    if args.mask and not args.codebook:
        raise InputError("--mask needs --codebook")
    model, tok = _load(args)
    if args.codebook:
        model = load_codebook_model(model, args.codebook, args.mask, args.mode, force=args.force)
    out = {"codebook": args.codebook, "masks": args.mask,
           "masked_codes": len(model.icu_codebook.codes) if args.codebook else 0, "sets": {}}
    for spec in args.data:
        name, _, path = spec.rpartition("=")
        name = name or Path(path).stem
        s = lm_scores(model, windows(tok, read_texts(path, args.text_field), args.max_length), tok.pad_token_id)
        out["sets"][name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()
                             if not k.startswith("per_sample")}
    print_json(out)
    return 0
