"""The forget-adapter contract: a stock PEFT adapter directory plus `forget_manifest.json`.

    DIR/
      adapter_config.json          stock PEFT
      adapter_model.safetensors    stock PEFT (safetensors only)
      forget_manifest.json         who/what/how, per-sample scores by salted hash, file sha256s

Writing is atomic (temporary directory, then rename); reading checks every file's sha256 against
the manifest and the base model's fingerprint against the one the adapter was trained on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import InputError, IntegrityError, OutputExistsError

logger = logging.getLogger("icu_peft")

MANIFEST_NAME = "forget_manifest.json"
MANIFEST_FORMAT = "icu-peft/forget-adapter/v1"
MERGED_FORMAT = "icu-peft/merged-model/v1"
SIGNATURE_NAME = "forget_manifest.sig"  # written by `icu-peft sign` (signing.py), beside the manifest it signs


def utc_now() -> str:
    """The timestamp format of every manifest."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: str | Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(directory: str | Path) -> Dict[str, str]:
    """sha256 of every file under `directory` except the manifest, keyed by relative path."""
    directory = Path(directory)
    out = {}
    # Only the root manifest is skipped: the manifests of embedded adapters (combined adapters,
    # merged models) are files like any other and must be covered by the outer hashes.
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p not in (directory / MANIFEST_NAME, directory / SIGNATURE_NAME):
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def check_output_dir(out: str | Path, overwrite: bool, inputs: Sequence[Optional[str | Path]] = ()) -> Path:
    """Everything that can make writing `out` fail, checked before any heavy work.

    Refuses an existing non-empty directory unless `overwrite`; an `out` that is, holds or lies
    inside one of `inputs` (the base model, the adapters being combined: `--overwrite` would replace
    them); and a place this process cannot write, probed by creating (and removing) a temporary
    directory where the output's rename will happen. Training is never spent on an output that
    cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path exists and is not a directory: {out}")
    real_out = out.resolve()
    for src in inputs:
        if src is None or not Path(src).exists():
            continue
        real_src = Path(src).resolve()
        if real_out == real_src or real_src in real_out.parents or real_out in real_src.parents:
            raise InputError(f"output directory {out} overlaps an input ({src}): choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory exists and is not empty: {out} (use --overwrite)")
    _probe_writable(out)
    return out


def _probe_writable(out: Path) -> None:
    parent = out.resolve().parent
    ancestor = parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create output directory {out}: {ancestor} is not a directory")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".icu-peft-write-probe-", dir=ancestor))
        probe.rmdir()
    except OSError as e:
        raise InputError(f"cannot write output directory {out}: {e.strerror or e} ({ancestor})") from None


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename.

    On any exception the temporary directory is removed and `out` is left as it was.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_directory(src: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Copy a whole adapter directory (subdirectories too: a combined adapter keeps its parts there) to
    `out`, atomically."""
    with atomic_output_dir(out, overwrite) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
    return Path(out)


def canonical_manifest_bytes(manifest: dict) -> bytes:
    """The bytes a manifest digest and signature cover: canonical JSON without the digest itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def manifest_digest(manifest: dict) -> str:
    return hashlib.sha256(canonical_manifest_bytes(manifest)).hexdigest()


def check_manifest_digest(directory: str | Path, manifest: dict) -> None:
    """The manifest must hash to the digest it was written with: an edited threshold or status is refused.

    A digest stored beside what it covers catches edits, not a forger who recomputes it; `sign` and
    `verify --public-key` are what prove to a recipient who wrote the manifest.
    """
    want = manifest.get("manifest_sha256")
    if want is None:
        raise IntegrityError(f"{directory}: the manifest carries no digest (written by an older icu-peft or edited); "
                             f"refused")
    if manifest_digest(manifest) != want:
        raise IntegrityError(f"{directory}: the manifest was edited after it was written (its digest does not match)")


def write_manifest(directory: str | Path, manifest: dict) -> dict:
    """Record the sha256 of every file in `directory` and the manifest's own digest; write it."""
    manifest = dict(manifest)
    manifest.pop("manifest_sha256", None)
    manifest.setdefault("format", MANIFEST_FORMAT)
    manifest["files"] = file_hashes(directory)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    Path(directory, MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise IntegrityError(f"not a directory: {directory}")
    if not path.exists():
        raise IntegrityError(f"{directory} has no {MANIFEST_NAME}: not an icu-peft forget adapter")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise IntegrityError(f"{path} is not valid JSON") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise IntegrityError(f"{path} is not an icu-peft manifest")
    return manifest


def inside(directory: str | Path, rel) -> Path:
    """`directory / rel`, refusing what a manifest must never name: absolute paths, '..', symlinks out.

    Every path a manifest lists goes through here before any file is opened, hashed or copied, so a
    tampered manifest cannot make icu-peft read /etc/passwd or copy a folder from outside the adapter.
    """
    directory = Path(directory)
    if not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or Path(rel).is_absolute() \
            or ".." in Path(rel).parts or "\\" in rel or ":" in Path(rel).parts[0]:
        raise IntegrityError(f"{directory}: the manifest names a path outside the adapter directory: {rel!r}")
    p = directory / rel
    root = directory.resolve()
    real = p.resolve()
    if real != root and root not in real.parents:
        raise IntegrityError(f"{directory}: the manifest path {rel!r} leads outside the adapter directory")
    return p


# files each kind of directory cannot be used without (a manifest that drops them is refused)
REQUIRED_FILES = {"adapter": ("adapter_config.json", "adapter_model.safetensors"),
                  "combined": ("adapter_config.json", "adapter_model.safetensors"),
                  "merged": ("config.json",)}


def check_manifest_paths(directory: str | Path, manifest: dict) -> None:
    """Every path the manifest names (files, parts) is inside `directory`; the kind's files are listed."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise IntegrityError(f"{directory}: manifest has no file list")
    for rel in files:
        inside(directory, rel)
    kind = manifest_kind(manifest)
    parts = manifest.get("components" if kind == "combined" else "adapters", []) if kind in ("combined", "merged") else []
    if not isinstance(parts, list):
        raise IntegrityError(f"{directory}: manifest part list is malformed")
    for entry in parts:
        if not isinstance(entry, dict):
            raise IntegrityError(f"{directory}: manifest part entry is malformed")
        inside(directory, entry.get("relpath"))
    missing = [f for f in REQUIRED_FILES.get(kind, ()) if f not in files]
    if kind == "merged" and not any(f.endswith(".safetensors") and "/" not in f for f in files):
        missing.append("model weights (*.safetensors)")
    if missing:
        raise IntegrityError(f"{directory}: the manifest does not list {', '.join(missing)}: an incomplete "
                             f"{'model' if kind == 'merged' else 'adapter'} is refused")


def verify_files(directory: str | Path, manifest: Optional[dict] = None) -> dict:
    """Check every file listed in the manifest against its sha256; refuse unlisted weight files.

    Paths are checked first (nothing outside `directory` is ever opened), then the manifest's own
    digest, then each file. Returns the manifest. Raises IntegrityError naming the first problem.
    """
    directory = Path(directory)
    manifest = manifest or read_manifest(directory)
    check_manifest_paths(directory, manifest)
    check_manifest_digest(directory, manifest)
    listed = manifest["files"]
    for rel, digest in listed.items():
        p = inside(directory, rel)
        if not p.is_file():
            raise IntegrityError(f"{directory}: file {rel} listed in the manifest is missing")
        if sha256_file(p) != digest:
            raise IntegrityError(f"{directory}: sha256 of {rel} does not match the manifest (tampered or corrupted)")
    for p in directory.rglob("*"):
        rel = p.relative_to(directory).as_posix()
        if p.is_file() and p != directory / MANIFEST_NAME and rel not in listed:
            if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json", ".pkl", ".npy"):
                raise IntegrityError(f"{directory}: file {rel} is not listed in the manifest")
    if any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in directory.rglob("*")):
        raise IntegrityError(f"{directory}: pickle-based weight files are refused; safetensors only")
    return manifest


def check_base(manifest: dict, fingerprint: dict, where: str = "", force: bool = False) -> None:
    """Refuse an adapter trained on another base unless `force` (the file hashes are never forced)."""
    want_fp = manifest.get("base", {}).get("fingerprint", {})
    want, have = want_fp.get("sha256"), fingerprint.get("sha256")
    # every weight file too, where both sides know them (manifests from before it have the embeddings only)
    want_w, have_w = want_fp.get("weights_sha256"), fingerprint.get("weights_sha256")
    if want_w and have_w and want_w != have_w and not force:
        name = manifest.get("base", {}).get("name_or_path", "?")
        raise IntegrityError(
            f"{where or 'adapter'} was trained on a different base model ({name}): the weights differ "
            f"(checkpoint fingerprint {want_w[:12]}, this base {have_w[:12]}; use --force to load anyway)"
        )
    if want and have and want != have and not force:
        name = manifest.get("base", {}).get("name_or_path", "?")
        raise IntegrityError(
            f"{where or 'adapter'} was trained on a different base model ({name}, fingerprint {want[:12]}); "
            f"this base has fingerprint {have[:12]} (use --force to load anyway)"
        )


def manifest_kind(manifest: dict) -> str:
    """'adapter' (one request), 'combined' (several, one LoRA) or 'merged' (a standalone model)."""
    return manifest.get("kind") or ("merged" if manifest.get("format") == MERGED_FORMAT else "adapter")


def leaf_manifests(directory: str | Path, manifest: Optional[dict] = None) -> List[Tuple[Path, dict]]:
    """The single-request manifests inside an adapter, combined adapter or merged model.

    Combined adapters and merged models embed a copy of every adapter they are made of (with its
    own manifest, salt and thresholds), so audits and revocation work from the directory alone.
    """
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    kind = manifest_kind(manifest)
    if kind == "adapter":
        return [(directory, manifest)]
    out: List[Tuple[Path, dict]] = []
    for entry in manifest.get("components" if kind == "combined" else "adapters", []):
        sub = inside(directory, entry["relpath"])
        out.extend(leaf_manifests(sub, read_manifest(sub)))
    return out


def adapter_weights_sha256(manifest: dict) -> Optional[str]:
    """Identity of an adapter's weights (stable across copies of its directory)."""
    return manifest.get("files", {}).get("adapter_model.safetensors")


def merged_manifest_of(model) -> Optional[Tuple[Path, dict]]:
    """(directory, manifest) when `model` was loaded from an icu-peft merged model directory."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    where = getattr(getattr(causal, "config", None), "_name_or_path", None)
    if not where or not Path(where, MANIFEST_NAME).is_file():
        return None
    try:
        m = read_manifest(where)
    except IntegrityError:
        return None
    return (Path(where), m) if manifest_kind(m) == "merged" else None


def adapter_name_for(directory: str | Path, manifest: dict, taken: Sequence[str]) -> str:
    """A PEFT adapter name for a forget adapter: its request id, made unique."""
    raw = str(manifest.get("request_id") or Path(directory).name)
    # PEFT adapter names become module-dict keys: no dots, and keep them short.
    base = "forget_" + "".join(c if c.isalnum() else "_" for c in raw)[:24]
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def check_stack(directories: Sequence[str | Path], manifests: Sequence[dict], already: Sequence[Tuple[Path, dict]] = ()):
    """Refuse a stack that would apply one request twice (the same weights listed twice, an
    adapter that is also inside a combined adapter, or one already merged into the base)."""
    seen: Dict[str, str] = {}
    for d, m in already:
        for leaf_dir, leaf in leaf_manifests(d, m):
            seen[adapter_weights_sha256(leaf) or str(leaf_dir)] = f"already merged into {d}"
    for d, m in zip(directories, manifests):
        if manifest_kind(m) == "merged":
            raise IntegrityError(f"{d} is a merged model, not an adapter: pass it as --model")
        for leaf_dir, leaf in leaf_manifests(d, m):
            key = adapter_weights_sha256(leaf) or str(leaf_dir)
            if key in seen:
                raise IntegrityError(f"{d}: request {leaf.get('request_id')} would be applied twice ({seen[key]})")
            seen[key] = f"also in {d}"
    # An adapter trained sequentially (with others active) was only measured with them present.
    for d, m in zip(directories, manifests):
        for _, leaf in leaf_manifests(d, m):
            for dep in leaf.get("stacked_on") or []:
                if dep.get("adapter_sha256") not in seen:
                    logger.warning("request %s was trained with request %s active, which is not in this stack: "
                                   "its forgetting was measured with it", leaf.get("request_id"), dep.get("request_id"))


def load_forget_adapters(base_model, directories: Sequence[str | Path], force: bool = False):
    """Load one or more forget adapters onto `base_model`, all active at once (a stack).

    Every adapter is integrity-checked (sha256 of its files) and base-checked (fingerprint) first.
    Returns the PeftModel; its `icu_adapters` attribute lists (name, directory, manifest).
    """
    from peft import PeftModel

    from .models import base_fingerprint

    if not directories:
        raise ValueError("no adapter directories given")
    fp = base_fingerprint(base_model)
    manifests = []
    for d in directories:
        m = verify_files(d)
        if manifest_kind(m) != "merged":
            check_base(m, fp, where=str(d), force=force)
        manifests.append(m)
    merged = merged_manifest_of(base_model)
    check_stack(directories, manifests, [merged] if merged else [])
    names: List[str] = []
    model = None
    for d, m in zip(directories, manifests):
        name = adapter_name_for(d, m, names)
        if model is None:
            model = PeftModel.from_pretrained(base_model, str(d), adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(str(d), adapter_name=name, is_trainable=False)
        names.append(name)
    if len(names) > 1:
        # PeftModel.set_adapter takes one name; the tuner layer accepts a list (all active, summed).
        model.base_model.set_adapter(names)
    for p in model.parameters():
        p.requires_grad_(False)
    model.icu_adapters = list(zip(names, [str(d) for d in directories], manifests))
    model.eval()
    return model
