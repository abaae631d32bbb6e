"""`icu-peft merge`: bake forget adapters into a standalone model (full precision, from the pristine base)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("merge", help="merge forget adapters into a standalone safetensors model")
    p.add_argument("--model", required=True,
                   help="pristine base model directory (or a merged model: its adapters are re-merged with the new ones)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--adapter", action="append", default=[], metavar="DIR", required=True,
                   help="forget adapter to merge; repeat for several")
    p.add_argument("--out", required=True, help="output directory for the merged model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (auto: the base checkpoint's); the merge itself runs in float32")
    p.add_argument("--force", action="store_true", help="merge adapters trained on a different base (hashes are always checked)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..lifecycle import merge_adapters

    m = merge_adapters(args.model, args.adapter, args.out, gguf_file=args.gguf_file, dtype=args.dtype,
                       force=args.force, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {args.out}")
    print(f"  base: {m['base']['name_or_path']} (fingerprint {m['base']['fingerprint']['sha256'][:12]})")
    print(f"  merged in {m['merge']['compute_dtype']}, saved as {m['merge']['dtype']}: "
          f"{', '.join(m['merge']['order']) or 'no adapters'}")
    print("  load it with transformers.AutoModelForCausalLM.from_pretrained (quantize at load time if wanted)")
    return 0
