"""`icu-peft generate`: a quick look at what a base (plus a stack of forget adapters) writes."""

from __future__ import annotations

from ._common import add_model_args, load_model_with_adapters


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a base model with forget adapters stacked on it")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate per prompt")
    p.add_argument("--sample", action="store_true", help="sample (top-p 0.95) instead of greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="random seed when sampling")
    p.add_argument("--compare", action="store_true", help="also show the base model's output with every adapter off")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..errors import InputError
    from ..metrics import model_device

    if args.max_new_tokens < 1:
        raise InputError("--max-new-tokens must be >= 1")
    model, tok = load_model_with_adapters(args)
    device = model_device(model)
    has_adapters = hasattr(model, "disable_adapter")

    def complete(prompt: str) -> str:
        enc = tok(prompt, return_tensors="pt").to(device)
        torch.manual_seed(args.seed)
        kw = dict(do_sample=True, top_p=0.95) if args.sample else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
        return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    label = f"with {len(args.adapter)} adapter(s)" if args.adapter else "base"
    for prompt in args.prompt:
        print(f"prompt: {prompt}")
        print(f"  {label}: {complete(prompt)}")
        if args.compare and has_adapters:
            with model.disable_adapter():
                print(f"  base (adapters off): {complete(prompt)}")
    return 0
