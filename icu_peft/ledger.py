"""The forget ledger: every request of one served base, and one consolidated adapter that serves them all.

Requests arrive one at a time for as long as a model is in service. Each keeps its own adapter and
manifest in the ledger (the audit trail, revocable one by one); what is served is one **consolidated**
adapter of fixed rank trained on the union of the active requests, warm-started from the last
consolidated adapter (`ICUConfig.init_adapter`) while requests are only added (after a revocation it
starts from zero: the old weights still hold the revoked request), so serving cost does not
grow with the number of requests. The ledger records which requests (by id and adapter hash) the
consolidated adapter covers, so `status` can say when it is stale: a request added since, or a
revoked one it still covers.

Layout of a ledger directory:

    ledger.json            requests (id, adapter and manifest hashes, status), the consolidation record
    requests/<id>/         each request's own forget adapter, copied in after its integrity check
    consolidated/          the served adapter (an ordinary forget adapter: inspect, verify, export it)

The ledger holds no text. Consolidation needs the active requests' texts again: the operator passes
them, and the ledger checks with the keyed sample ids of each request's manifest (idkeys.py) that
they are exactly the active requests' samples, none missing and none from a revoked request.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .adapters import (adapter_weights_sha256, check_base, copy_directory, manifest_kind, read_manifest, utc_now,
                       verify_files)
from .atomicfile import atomic_write
from .errors import InputError

logger = logging.getLogger("icu_peft")

LEDGER_NAME = "ledger.json"
LEDGER_FORMAT = "icu-peft/ledger/v1"
CONSOLIDATED = "consolidated"


def _safe(request_id: str) -> str:
    """A directory name for a request id (ids are UUIDs or operator strings)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(request_id))[:100]
    if name in ("", ".", ".."):
        raise InputError(f"request id '{request_id}' cannot name a directory")
    return name


def read_ledger(directory: str | Path, create: bool = False) -> dict:
    path = Path(directory) / LEDGER_NAME
    if not path.is_file():
        if create:
            return {"format": LEDGER_FORMAT, "base": None, "requests": [], "consolidated": None, "history": []}
        raise InputError(f"{directory}: not a forget ledger (no {LEDGER_NAME}); `icu-peft ledger add` starts one")
    try:
        ledger = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ledger ({e})") from None
    if not isinstance(ledger, dict) or ledger.get("format") != LEDGER_FORMAT:
        raise InputError(f"{path}: not an icu-peft ledger of format {LEDGER_FORMAT}")
    return ledger


def _write_ledger(directory: Path, ledger: dict) -> None:
    """Replace ledger.json atomically (a temporary file in the same directory, then rename)."""
    atomic_write(directory / LEDGER_NAME, json.dumps(ledger, indent=2) + "\n")


def active(ledger: dict) -> List[dict]:
    return [r for r in ledger["requests"] if r["status"] == "active"]


def add_request(directory: str | Path, adapter: str | Path) -> dict:
    """Check `adapter` (files, base) and copy it into the ledger as an active request."""
    directory, adapter = Path(directory), Path(adapter)
    manifest = verify_files(adapter)
    if manifest_kind(manifest) != "adapter":
        raise InputError(f"{adapter}: only single-request forget adapters go into a ledger")
    directory.mkdir(parents=True, exist_ok=True)
    ledger = read_ledger(directory, create=True)
    fingerprint = manifest.get("base", {}).get("fingerprint", {})
    if ledger["base"] is None:
        ledger["base"] = {"name_or_path": manifest.get("base", {}).get("name_or_path"), "fingerprint": fingerprint}
    else:
        check_base(manifest, ledger["base"]["fingerprint"], where=f"{adapter}")
    rid = manifest.get("request_id")
    if any(r["request_id"] == rid for r in ledger["requests"]):
        raise InputError(f"request {rid} is already in the ledger")
    rel = f"requests/{_safe(rid)}"
    copy_directory(adapter, directory / rel)
    entry = {"request_id": rid, "path": rel, "adapter_sha256": adapter_weights_sha256(manifest),
             "manifest_sha256": manifest.get("manifest_sha256"), "samples": len(manifest.get("samples", [])),
             "status": "active", "added_at": utc_now()}
    ledger["requests"].append(entry)
    ledger["history"].append({"op": "add", "request_id": rid, "at": entry["added_at"]})
    _write_ledger(directory, ledger)
    return entry


def revoke_request(directory: str | Path, request_id: str) -> dict:
    """Mark a request revoked and delete its adapter; the consolidated adapter covers it until re-consolidated."""
    directory = Path(directory)
    ledger = read_ledger(directory)
    hits = [r for r in active(ledger) if r["request_id"] == request_id]
    if not hits:
        raise InputError(f"no active request {request_id} in the ledger")
    entry = hits[0]
    shutil.rmtree(directory / entry["path"], ignore_errors=True)
    entry.update(status="revoked", revoked_at=utc_now())
    ledger["history"].append({"op": "revoke", "request_id": request_id, "at": entry["revoked_at"]})
    _write_ledger(directory, ledger)
    return entry


def _coverage(ledger: dict) -> tuple:
    """(active requests the served adapter does not cover, revoked requests it still covers), by id and
    adapter hash."""
    cons = ledger.get("consolidated") or {}
    covered = {(c["request_id"], c["adapter_sha256"]) for c in cons.get("covers", [])}
    serving = [(r["request_id"], r["adapter_sha256"]) for r in active(ledger)]
    return ([rid for rid, h in serving if (rid, h) not in covered],
            sorted(rid for rid, h in covered if (rid, h) not in set(serving)))


def status(directory: str | Path) -> dict:
    """Active requests, what the served (consolidated) adapter covers, and whether it is stale."""
    ledger = read_ledger(directory)
    cons = ledger.get("consolidated") or {}
    missing, revoked_still = _coverage(ledger)
    return {"active": [r["request_id"] for r in active(ledger)],
            "revoked": [r["request_id"] for r in ledger["requests"] if r["status"] == "revoked"],
            "consolidated": cons or None, "not_covered": missing, "revoked_but_served": revoked_still,
            "up_to_date": bool(cons) and not missing and not revoked_still}


def match_texts(directory: str | Path, texts: Sequence[str], id_keys: Sequence[str] = ()) -> Dict[str, int]:
    """Check that `texts` are exactly the active requests' samples (by their manifests' keyed ids);
    returns samples per request. Raises InputError naming what is missing or foreign."""
    from .idkeys import manifest_key
    from .lifecycle import match_samples

    directory = Path(directory)
    leaves = _active_leaves(directory, read_ledger(directory))
    for _, m in leaves:
        if manifest_key(m, id_keys) is None:
            raise InputError(f"request {m.get('request_id')}: its sample-id key is not on this machine "
                             f"($ICU_PEFT_ID_KEYS): the texts cannot be matched to it")
    hits, _ = match_samples(texts, leaves, id_keys)
    found = set()
    for i, hit in enumerate(hits):
        if hit is None:
            raise InputError(f"text {i + 1} is not a sample of any active request (a revoked request's, or "
                             f"none): consolidation trains on the active requests only")
        found.add((hit[1][1].get("request_id"), hit[0]))
    per: Dict[str, int] = {}
    for _, m in leaves:
        rid = m.get("request_id")
        if any((rid, smp["id"]) not in found for smp in m.get("samples", [])):
            raise InputError(f"request {rid}: some of its samples are missing from the texts given")
        per[rid] = len(m.get("samples", []))
    return per


def _active_leaves(directory: Path, ledger: dict) -> List[tuple]:
    """(directory, manifest) of each active request, as lifecycle.match_samples takes them."""
    return [(directory / r["path"], read_manifest(directory / r["path"])) for r in active(ledger)]


def _check_restore(directory: Path, ledger: dict, restore: Sequence[str], id_keys: Sequence[str]) -> None:
    """Refuse texts to restore that are samples of an active request (forgotten and kept at once)."""
    from .lifecycle import match_samples

    hits, _ = match_samples(restore, _active_leaves(directory, ledger), id_keys)
    for i, hit in enumerate(hits):
        if hit is not None:
            raise InputError(f"text {i + 1} to restore is a sample of active request {hit[1][1].get('request_id')}: "
                             f"revoke that request first")


def consolidate(directory: str | Path, config, texts: Sequence[str], retain: Optional[Sequence[str]] = None,
                unseen: Optional[Sequence[str]] = None, id_keys: Sequence[str] = (),
                restore: Optional[Sequence[str]] = None, warm: bool = True):
    """Train the served adapter on the union of the active requests, warm-started from the last one.

    `restore`: texts that must come back, a revoked request's: they join the retain anchors, so the new
    adapter is held to the base on them. Without them an adapter trained on the other requests of the
    same kind still lowered the revoked one (MA 0.75 against 0.97 before; docs/BENCHMARKS.md). Refused
    where one is a sample of an active request.

    `warm=False` trains from zero even where a warm start applies. On SmolLM2 a warm-started consolidation
    of a second one-person request took 2343 s against 661 s from zero before the forget term pulled
    samples back from past the never-seen band; with that pull it took 638 s (docs/BENCHMARKS.md, "Forget
    ledger and stacking"), and on the tiny memoriser the warm start was the cheaper one too.

    Returns the ForgetResult. The new adapter replaces `consolidated/` only once it is written; the
    ledger then records the requests it covers (id and adapter hash) and its status."""
    from .unlearner import forget

    directory = Path(directory)
    ledger = read_ledger(directory)
    if not active(ledger):
        raise InputError("the ledger has no active request to consolidate")
    per = match_texts(directory, texts, id_keys)
    if restore:
        _check_restore(directory, ledger, restore, id_keys)
        retain = list(restore) + list(retain or [])
    previous = directory / CONSOLIDATED
    if previous.is_dir() and config.init_adapter is None and warm:
        was = read_manifest(previous).get("config", {})
        same = all(was.get(k) == getattr(config, k) for k in ("lora_r", "lora_alpha", "lora_layers", "target_modules"))
        # warm start only while requests have only been added: the served adapter's weights hold every
        # request it covers, so starting from them after a revocation keeps the revoked request forgotten
        # (measured: its MA stayed at 0.51 against 0.97 before; benchmarks/stacking.py --ledger)
        if same and not _coverage(ledger)[1]:
            config = dataclasses.replace(config, init_adapter=str(previous))
        else:
            logger.info("ledger: consolidating from zero (%s)", "a request was revoked since the last consolidation"
                        if same else "the LoRA settings differ from the served adapter's")
    config = dataclasses.replace(config, request_id=config.request_id or f"consolidated-{len(ledger['history'])}")
    # forget writes its adapter atomically: `consolidated/` is replaced only once the new one is complete
    result = forget(config, texts, retain, unseen, output_dir=previous, overwrite=True)
    covers = [{"request_id": r["request_id"], "adapter_sha256": r["adapter_sha256"], "samples": per[r["request_id"]]}
              for r in active(ledger)]
    rep = result.report
    ledger["consolidated"] = {"path": CONSOLIDATED, "request_id": rep["request_id"], "status": rep["status"],
                              "forgotten": rep["forget"]["forgotten"], "samples": rep["forget"]["count"],
                              "steps": rep["steps"], "warm_start": config.init_adapter is not None,
                              "rank": config.lora_r, "covers": covers, "restored_texts": len(restore or ()),
                              "at": utc_now()}
    ledger["history"].append({"op": "consolidate", "request_ids": [c["request_id"] for c in covers],
                              "status": rep["status"], "at": ledger["consolidated"]["at"]})
    _write_ledger(directory, ledger)
    return result


__all__ = ["LEDGER_NAME", "read_ledger", "add_request", "revoke_request", "status", "match_texts", "consolidate"]
