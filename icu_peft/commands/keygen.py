"""`icu-peft keygen`: an Ed25519 key pair for signing forget adapters (`icu-peft sign`)."""

from __future__ import annotations


def add_parser(sub) -> None:
    k = sub.add_parser("keygen", help="create an Ed25519 key pair for signing forget adapters",
                       description="Writes a private key (mode 0600: keep it with the operator) and a public key "
                                   "(give it to whoever audits your adapters: `verify --public-key`).")
    k.add_argument("--private-key", required=True, metavar="FILE", help="where to write the private key (PEM)")
    k.add_argument("--public-key", required=True, metavar="FILE", help="where to write the public key (PEM)")
    k.set_defaults(func=run)


def run(args) -> int:
    from ..signing import generate_keypair

    kid = generate_keypair(args.private_key, args.public_key)
    print(f"key pair written: private {args.private_key} (keep it secret), public {args.public_key} "
          f"(key id {kid[:16]})")
    return 0
