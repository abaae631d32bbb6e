"""`icu-peft sign`: an Ed25519 signature over an adapter's manifest (which lists every file's sha256)."""

from __future__ import annotations


def add_parser(sub) -> None:
    s = sub.add_parser("sign", help="sign a forget adapter, combined adapter or merged model (after checking its files)",
                       description="Checks every file against the manifest, then writes forget_manifest.sig: an "
                                   "Ed25519 signature over the manifest, which lists every file's sha256. Keys come "
                                   "from `icu-peft keygen`; recipients check with `icu-peft verify --public-key`.")
    s.add_argument("dir", metavar="DIR", help="adapter, combined adapter or merged model directory")
    s.add_argument("--key", required=True, metavar="FILE", help="private key (PEM) from `icu-peft keygen`")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..signing import SIGNATURE_NAME, sign_directory

    sig = sign_directory(args.dir, args.key)
    print(f"signed {args.dir} ({SIGNATURE_NAME}, key id {sig['public_key_sha256'][:16]})")
    return 0
