"""Arguments and loading shared by the commands that take a model (and an adapter stack)."""

from __future__ import annotations

import argparse
import json
import sys


def add_model_args(p: argparse.ArgumentParser, adapters: bool = True) -> None:
    p.add_argument("--model", required=True, help="base model: local directory or hub id")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    p.add_argument("--no-quantize", action="store_true", help="keep the base in full precision (default: 4-bit NF4)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")
    if adapters:
        p.add_argument("--adapter", action="append", default=[], metavar="DIR",
                       help="forget adapter to apply; repeat to stack several")
        p.add_argument("--force", action="store_true",
                       help="load adapters trained on a different base (file hashes are always checked)")


def load_model_with_adapters(args):
    """(model, tokenizer) for --model with every --adapter stacked on top (integrity-checked)."""
    from ..adapters import load_forget_adapters
    from ..models import load_base_model, load_tokenizer

    tok = load_tokenizer(args.model, args.gguf_file, args.trust_remote_code)
    model = load_base_model(args.model, quantize=not args.no_quantize, gguf_file=args.gguf_file,
                            trust_remote_code=args.trust_remote_code)
    if getattr(args, "adapter", None):
        model = load_forget_adapters(model, args.adapter, force=getattr(args, "force", False))
    return model, tok


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")
