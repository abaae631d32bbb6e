"""Ed25519 signatures over a forget adapter (or merged model) so a recipient can check who made it.

A sha256 stored inside the manifest only shows that nobody edited the files *and forgot to update
the manifest*. A signature made with the operator's private key, checked with their published
public key, shows that the manifest (and through its file hashes, every file) is exactly what that
operator wrote. The signature lives beside the manifest in `forget_manifest.sig`:

    {"algorithm": "ed25519", "public_key_sha256": "...", "signature": "<base64>"}

It signs `adapters.canonical_manifest_bytes(manifest)` with the digest included. Keys are PEM
files from `cryptography`; the private key is written with mode 0600 and never leaves the operator.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from .adapters import SIGNATURE_NAME
from .atomicfile import atomic_write
from .errors import InputError, IntegrityError

ALGORITHM = "ed25519"


def _serialization():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - cryptography is a dependency
        raise InputError("signing needs the 'cryptography' package: pip install cryptography") from None
    return serialization, ed25519


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that must not exist yet, with `mode`, atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode)


def generate_keypair(private_path: str | Path, public_path: str | Path) -> str:
    """A new Ed25519 key pair as PEM files; returns the public key's sha256 (its short identity)."""
    serialization, ed25519 = _serialization()
    private_path, public_path = Path(private_path), Path(public_path)
    for p in (private_path, public_path):
        if p.exists():
            raise InputError(f"refusing to overwrite an existing key file: {p}")
    if private_path.resolve() == public_path.resolve():
        raise InputError("the private and public key paths must differ")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return public_key_id(key.public_key())


def public_key_id(public_key) -> str:
    serialization, _ = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _load(path: str | Path, private: bool):
    serialization, ed25519 = _serialization()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"key file not found: {p}")
    data = p.read_bytes()
    try:
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except (ValueError, TypeError) as e:
        raise InputError(f"{p} is not an unencrypted PEM {'private' if private else 'public'} key: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, want):
        raise InputError(f"{p} is not an Ed25519 key")
    return key


def sign_directory(directory: str | Path, private_key_path: str | Path) -> dict:
    """Check the artifact's files, then sign its manifest; writes `forget_manifest.sig`. Returns its content."""
    from .adapters import canonical_manifest_bytes, verify_files

    directory = Path(directory)
    key = _load(private_key_path, private=True)  # a bad key fails before anything is read or written
    manifest = verify_files(directory)  # never sign an artifact that does not check out
    sig = {"algorithm": ALGORITHM, "public_key_sha256": public_key_id(key.public_key()),
           "signature": base64.b64encode(key.sign(canonical_manifest_bytes(manifest))).decode()}
    target = directory / SIGNATURE_NAME
    if not os.access(directory, os.W_OK):
        raise InputError(f"cannot write the signature into {directory}")
    target.unlink(missing_ok=True)
    _write_new(target, (json.dumps(sig, indent=2) + "\n").encode(), 0o644)
    return sig


def verify_signature(directory: str | Path, public_key_path: str | Path) -> dict:
    """Raise IntegrityError unless `directory`'s manifest carries a valid signature by this public key.

    The files are checked against the manifest first, so a valid signature covers every file.
    """
    from cryptography.exceptions import InvalidSignature

    from .adapters import canonical_manifest_bytes, verify_files

    directory = Path(directory)
    key = _load(public_key_path, private=False)
    manifest = verify_files(directory)
    path = directory / SIGNATURE_NAME
    if not path.is_file():
        raise IntegrityError(f"{directory} is not signed (no {SIGNATURE_NAME})")
    try:
        sig = json.loads(path.read_text())
        raw = base64.b64decode(sig["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise IntegrityError(f"{path} is not a valid signature file") from None
    if sig.get("algorithm") != ALGORITHM:
        raise IntegrityError(f"{path}: unsupported signature algorithm {sig.get('algorithm')!r}")
    try:
        key.verify(raw, canonical_manifest_bytes(manifest))
    except InvalidSignature:
        raise IntegrityError(f"{directory}: the signature does not match this public key and manifest "
                             f"(signed by someone else, or changed after signing)") from None
    return {"signed_by": public_key_id(key), "algorithm": ALGORITHM}


__all__ = ["SIGNATURE_NAME", "generate_keypair", "public_key_id", "sign_directory", "verify_signature"]
