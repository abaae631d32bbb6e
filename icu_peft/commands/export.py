"""`icu-peft export`: a serving-ready copy of a forget adapter (vLLM, plain PEFT, llama.cpp GGUF LoRA)."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="check a forget adapter for a serving engine and write its serving form",
                       description="Checks every file against the manifest first. --for vllm refuses what vLLM "
                                   "refuses (rank, DoRA, modules_to_save, biases, unsupported modules) and copies "
                                   "the adapter; --for peft copies it; --for llama.cpp writes a GGUF LoRA for a "
                                   "Llama-architecture base (needs --model).")
    p.add_argument("dir", metavar="DIR", help="forget adapter (or combined adapter) directory")
    p.add_argument("--for", dest="target", required=True, choices=["vllm", "peft", "llama.cpp"], help="serving engine")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", help="base model (llama.cpp: read for its architecture and head counts)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..export import export_adapter

    r = export_adapter(args.dir, args.out, args.target, model=args.model, gguf_file=args.gguf_file,
                       overwrite=args.overwrite)
    print(f"exported for {r['target']} to {r['out']}: {', '.join(r['files'])}")
    if r["note"]:
        print(f"  note: {r['note']}")
    return 0
