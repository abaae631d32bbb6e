"""`icu-peft plan`: predict a forget request's peak memory (and time) from the model's config alone."""

from __future__ import annotations

GIB = 2**30


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predict the peak memory (and time) of a forget request from the model's config",
                       description="Builds the model on the meta device (no weights are read) and adds up what a "
                                   "forget request holds at its peak; the activations are measured on one decoder "
                                   "layer of the real shape. Exit 0 when it fits --device-memory (or none was "
                                   "given), 1 when it does not.")
    p.add_argument("--model", required=True, metavar="DIR_OR_CONFIG",
                   help="model directory (only config.json is read), a config.json file, or a cached hub id")
    p.add_argument("--config", help="recipe YAML (ICUConfig fields), as for `forget`")
    p.add_argument("--no-quantize", action="store_true", help="plan for a full-precision base")
    p.add_argument("--full-ft", action="store_true", help="plan for full-fine-tuning ICU (every weight trains)")
    p.add_argument("--lora-r", type=int, help="LoRA rank")
    p.add_argument("--lora-layers", type=int, help="LoRA only in the last N layers (0: all)")
    p.add_argument("--max-length", type=int, help="tokens per sample at most")
    p.add_argument("--seq-len", type=int, help="tokens per sample to plan for (default: --max-length, the worst case)")
    p.add_argument("--batch-size", type=int, help="forget samples per step")
    p.add_argument("--forget-samples", type=int, default=8, help="samples in the request (default 8)")
    p.add_argument("--retain-samples", type=int, default=32, help="retain samples given (default 32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--precision-check", choices=["auto", "on", "off"], help="as for `forget`")
    p.add_argument("--compute-dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the request will run (cuda: bf16 compute, no CPU runtime share; default cpu)")
    p.add_argument("--device-memory", type=float, metavar="GIB", help="memory the request may use: answers 'fits'")
    p.add_argument("--tokens-per-second", type=float, metavar="TPS",
                   help="a measured training throughput (tokens per second): also predict the time of the step budget")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import ICUConfig
    from ..errors import InputError
    from ..planner import checkpoint_size, load_model_config, plan_memory, predicted_seconds
    from ._common import print_json

    over = dict(lora_r=args.lora_r, lora_layers=args.lora_layers, max_length=args.max_length,
                batch_size=args.batch_size, precision_check=args.precision_check, compute_dtype=args.compute_dtype,
                model=args.model, trust_remote_code=args.trust_remote_code or None,
                gradient_checkpointing=args.gradient_checkpointing or None)
    if args.no_quantize:
        over["quantize"] = False
    if args.full_ft:
        over.update(use_lora=False, quantize=False, method="icu_paper")
    if args.config:
        cfg = ICUConfig.from_yaml(args.config, **over)
    else:
        cfg = ICUConfig.for_method(over.pop("method", "icu"), **{k: v for k, v in over.items() if v is not None})
    for name in ("forget_samples", "retain_samples", "seq_len"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "retain_samples" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be a positive number")
    if args.device_memory is not None and not args.device_memory > 0:
        raise InputError("--device-memory must be a positive number of GiB")
    if args.tokens_per_second is not None and not args.tokens_per_second > 0:
        raise InputError("--tokens-per-second must be a positive number")
    model_config = load_model_config(args.model, cfg.trust_remote_code)
    plan = plan_memory(model_config, cfg, args.device, seq_len=args.seq_len, forget_samples=args.forget_samples,
                       retain_samples=args.retain_samples,
                       device_memory=args.device_memory * GIB if args.device_memory else None,
                       checkpoint_bytes=checkpoint_size(args.model))
    out = plan.as_dict()
    if args.tokens_per_second:
        out["predicted_seconds"] = predicted_seconds(plan, args.tokens_per_second)
    if args.json:
        print_json(out)
    else:
        s = plan.setting
        mode = "full fine-tuning" if not s["use_lora"] else ("NF4 + LoRA" if s["quantize"] else "LoRA, full-precision base")
        print(f"{s['model_type']}, {s['parameters'] / 1e6:.0f}M weights, {s['layers']} layers; {mode}, "
              f"{s['dtype']} compute on {s['device']}; {s['forget_samples']} samples of {s['seq_len']} tokens, "
              f"batch {s['batch_size']}")
        print(plan.summary())
        if "predicted_seconds" in out:
            grows = (f" (up to {out['predicted_seconds'] * s['step_budget_max'] / s['step_budget'] / 60:.1f} min if it "
                     f"grows to {s['step_budget_max']} steps)" if s.get("step_budget_max", 0) > s["step_budget"] else "")
            print(f"{'time':>16}: {out['predicted_seconds'] / 60:8.1f} min for the {s['step_budget']}-step budget "
                  f"at {args.tokens_per_second:g} tokens/s{grows}")
    return 1 if plan.fits is False else 0
