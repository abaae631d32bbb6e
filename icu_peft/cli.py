"""`icu-peft`: a thin command line over the library. Each subcommand lives in icu_peft/commands/.

Every command module exposes `add_parser(subparsers)` and `run(args) -> int`. Errors that are the
user's to fix (ICUError) print one line and exit 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

# name -> module under icu_peft.commands
COMMANDS = {
    "forget": "forget",
    "eval": "eval",
    "verify": "verify",
    "inspect": "inspect",
    "generate": "generate",
    "merge": "merge",
    "revoke": "revoke",
    "combine": "combine",
    "keygen": "keygen",
    "sign": "sign",
    "export": "export",
    "ledger": "ledger",
    "demo": "demo",
    "codebook": "codebook",
    "config": "config",
    "plan": "plan",
}


def _load(name: str):
    try:
        return importlib.import_module(f"icu_peft.commands.{COMMANDS[name]}")
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("icu_peft.commands"):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="icu-peft", description="Machine unlearning as detachable PEFT forget adapters.")
    parser.add_argument("--version", action="version", version=f"icu-peft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)
        if mod is not None:
            mod.add_parser(sub)
    return parser


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # -v is our debug lines, not every library's: at DEBUG on the root logger matplotlib alone printed
    # hundreds of font-matching lines into a demo's log
    logging.getLogger("icu_peft").setLevel(logging.DEBUG if verbose else logging.NOTSET)
    # transformers / peft chatter is not ours to show at INFO
    for noisy in ("transformers", "peft", "accelerate", "bitsandbytes", "httpx", "urllib3", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    import warnings

    for msg in ("Converting a tensor with requires_grad", "bitsandbytes::gemv_4bit", "`is_gradient_checkpointing`",
                "Failed to load CPU gemm_4bit", "`past_key_values` is deprecated"):
        warnings.filterwarnings("ignore", message=f".*{msg}.*")


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import ICUError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    setup_logging(args.verbose, args.quiet)
    from .allocator import return_freed_memory_to_os

    return_freed_memory_to_os()  # before any tensor: see allocator.py
    previous = _catch_sigterm()
    try:
        return int(args.func(args) or 0)
    except ICUError as e:
        print(f"icu-peft {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except Terminated:
        print(f"icu-peft {args.command}: terminated (SIGTERM); partial output removed", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"icu-peft {args.command}: interrupted; partial output removed", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary output directory is removed on the way out."""


def _catch_sigterm():
    """Turn SIGTERM into an exception (the default kills the process before any cleanup runs)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def raise_terminated(signum, frame):
        raise Terminated()

    return signal.signal(signal.SIGTERM, raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
