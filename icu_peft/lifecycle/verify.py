"""Re-score a forget set under a model and its stack: the audit."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..adapters import leaf_manifests
from ..errors import InputError


def collect_leaves(model) -> List[Tuple[Path, dict]]:
    """Single-request manifests behind a loaded model: its merged adapters and its stacked ones."""
    from ..adapters import merged_manifest_of

    leaves: List[Tuple[Path, dict]] = []
    merged = merged_manifest_of(model)
    if merged:
        leaves.extend(leaf_manifests(*merged))
    for _, d, m in getattr(model, "icu_adapters", []):
        leaves.extend(leaf_manifests(d, m))
    return leaves


def match_samples(texts: Sequence[str], leaves: Sequence[Tuple[Path, dict]], id_keys: Sequence[str] = ()):
    """(per text: (its keyed id, the (directory, manifest) that lists it) or None, the keys tried).

    A manifest names its sample-id key by id only; the key comes from this machine's key directory or
    `id_keys` (idkeys.py). Without it none of that manifest's samples can be matched."""
    from ..data import sample_id
    from ..idkeys import manifest_key

    index = {}
    for d, m in leaves:
        key = manifest_key(m, id_keys)
        for s in m.get("samples", []):
            index.setdefault((key, s["id"]), (d, m))
    salts = list(dict.fromkeys(k for k in (manifest_key(m, id_keys) for _, m in leaves) if k))
    hits = []
    for t in texts:
        ids = ((salt, sample_id(t, salt)) for salt in salts)
        hit = next(((sid, index[(salt, sid)]) for salt, sid in ids if (salt, sid) in index), None)
        hits.append(hit)
    return hits, salts


def verify_forget_set(model, tokenizer, texts: Sequence[str], leaves: Sequence[Tuple[Path, dict]] = (),
                      ma_threshold: Optional[float] = None, el_threshold: Optional[float] = None,
                      unseen: Optional[Sequence[str]] = None, batch_size: int = 16,
                      id_keys: Sequence[str] = ()) -> dict:
    """Re-score a forget set under `model`: per sample MA, EL_n and forgotten or not, plus a summary.

    Each text is matched to the adapter whose manifest lists its keyed id (the key from this
    machine's key directory or `id_keys`, see idkeys.py; without it no text matches); that manifest gives
    its thresholds and EL settings. Explicit thresholds override every manifest; `unseen` text
    scored by the model with every adapter switched off gives thresholds to samples no manifest
    lists (without it they get the strictest thresholds among the manifests).
    """
    from ..config import ICUConfig
    from ..data import new_salt, sample_id, tokenize_texts
    from ..metrics import score_samples
    from ..refine import Thresholds, is_forgotten

    if not texts:
        raise InputError("the forget set is empty")
    if (ma_threshold is None) != (el_threshold is None):
        raise InputError("give both --ma-threshold and --el-threshold, or neither")
    defaults = ICUConfig()
    hits, salts = match_samples(texts, leaves, id_keys)
    fallback_salt = salts[0] if salts else new_salt()

    rows = []
    for i, (t, hit) in enumerate(zip(texts, hits)):
        if hit is None:
            rows.append({"index": i, "id": sample_id(t, fallback_salt), "request_id": None, "manifest": None})
        else:
            rows.append({"index": i, "id": hit[0], "request_id": hit[1][1].get("request_id"), "manifest": hit[1][1]})

    def settings(m: Optional[dict]) -> Tuple[int, int, int, str]:
        c = (m or {}).get("config", {}) if m else (leaves[0][1].get("config", {}) if leaves else {})
        return (int(c.get("el_n", defaults.el_n)), int(c.get("el_start", defaults.el_start)),
                int(c.get("max_length", defaults.max_length)), c.get("criterion", "ma_el"))

    explicit = None
    if ma_threshold is not None:
        explicit = Thresholds(ma=ma_threshold, el=el_threshold, source="explicit")
    unseen_t: Dict[Tuple, Thresholds] = {}
    strict = None
    man_ts = [m.get("thresholds") for _, m in leaves if m.get("thresholds")]
    if man_ts:
        strict = Thresholds(ma=min(t["ma"] for t in man_ts), el=min(t["el"] for t in man_ts),
                            bleu=min(t.get("bleu", 0.01) for t in man_ts), source="strictest manifest")

    groups: Dict[Tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault(settings(r["manifest"]), []).append(r)
    pad = tokenizer.pad_token_id
    for (el_n, el_start, max_length, criterion), members in groups.items():
        tset = tokenize_texts([texts[r["index"]] for r in members], tokenizer, max_length, fallback_salt,
                              min_tokens=el_n + 1)
        with_bleu = criterion == "bleu"
        sc = score_samples(model, tset.input_ids, pad, el_n, el_start, batch_size, with_bleu=with_bleu)
        need_unseen = explicit is None and any(r["manifest"] is None for r in members) and unseen
        if need_unseen and (el_n, el_start, max_length) not in unseen_t:
            useen = tokenize_texts(unseen, tokenizer, max_length, fallback_salt, min_tokens=el_n + 1, name="unseen")
            ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _null()
            with ctx:
                us = score_samples(model, useen.input_ids, pad, el_n, el_start, batch_size).mean()
            unseen_t[(el_n, el_start, max_length)] = Thresholds(ma=us["ma"], el=us["el"], source="unseen",
                                                               unseen_count=len(useen))
        for j, r in enumerate(members):
            m = r["manifest"]
            if explicit is not None:
                t = explicit
            elif m is not None and m.get("thresholds"):
                mt = m["thresholds"]
                # the never-seen band's NLL edges too: a sample pushed past them is not forgotten
                t = Thresholds(ma=mt["ma"], el=mt["el"], bleu=mt.get("bleu", 0.01), source=f"manifest {r['request_id']}",
                               nll_lo=mt.get("nll_lo"), nll_hi=mt.get("nll_hi"))
            elif (el_n, el_start, max_length) in unseen_t:
                t = unseen_t[(el_n, el_start, max_length)]
            elif strict is not None:
                t = strict
            else:
                raise InputError("no thresholds for samples that no adapter manifest lists: give --unseen FILE "
                                 "or --ma-threshold and --el-threshold")
            bleu = sc.bleu[j] if sc.bleu is not None else None
            crit = criterion if m is not None and explicit is None else "ma_el"
            r.update(ma=sc.ma[j], el=sc.el[j], nll=sc.nll[j], el_n=el_n, threshold_ma=t.ma, threshold_el=t.el,
                     threshold_source=t.source, criterion=crit,
                     forgotten=is_forgotten(sc.ma[j], sc.el[j], t, bleu, crit, nll=sc.nll[j]))
            if t.nll_lo is not None:
                r.update(band_nll=[t.nll_lo, t.nll_hi])
            if bleu is not None:
                r.update(bleu=bleu, threshold_bleu=t.bleu)
    if explicit is None:
        _chance_outliers_per_request(rows)
    for r in rows:
        r.pop("manifest")
    rows.sort(key=lambda r: r["index"])
    n_ok = sum(r["forgotten"] for r in rows)
    matched = sum(r["request_id"] is not None for r in rows)
    summary = {
        "samples": len(rows), "forgotten": n_ok, "remembered": len(rows) - n_ok, "matched_to_manifest": matched,
        "mean_ma": sum(r["ma"] for r in rows) / len(rows), "mean_el": sum(r["el"] for r in rows) / len(rows),
        "mean_nll": sum(r["nll"] for r in rows) / len(rows),
        "requests": sorted({str(m.get("request_id")) for _, m in leaves}),
        "verdict": "PASS" if n_ok == len(rows) else "FAIL",
    }
    return {"samples": rows, "summary": summary}


def _chance_outliers_per_request(rows: List[dict]) -> None:
    """The forget run's chance allowance (refine.with_chance_outliers), per request, on its manifest's
    never-seen thresholds: verify says what forget said of the same scores."""
    from ..refine import Thresholds, with_chance_outliers

    by_request: Dict[str, List[dict]] = {}
    for r in rows:
        mt = (r["manifest"] or {}).get("thresholds") or {}
        if mt.get("source") == "unseen" and r.get("criterion") == "ma_el" and r.get("nll") is not None:
            by_request.setdefault(r["request_id"], []).append(r)
    for members in by_request.values():
        mt = members[0]["manifest"]["thresholds"]
        t = Thresholds(**{k: v for k, v in mt.items() if k in Thresholds.__dataclass_fields__})
        flags = with_chance_outliers([r["forgotten"] for r in members], [r["ma"] for r in members],
                                     [r["el"] for r in members], [r["nll"] for r in members], t)
        for r, f in zip(members, flags):
            if f and not r["forgotten"]:
                r.update(forgotten=True, chance_outlier=True)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def format_verify_line(r: dict) -> str:
    who = r["request_id"] or "unlisted"
    mark = ("forgotten (over an edge by chance)" if r.get("chance_outlier") else "forgotten") if r["forgotten"] \
        else "REMEMBERED"
    extra = f"  BLEU {r['bleu']:.3f}" if "bleu" in r else ""
    if "band_nll" in r:
        lo, hi = r["band_nll"]
        extra += f"  NLL {r['nll']:.2f} (in {lo:.2f}..{hi:.2f})"
    return (f"{r['id']}  MA {r['ma']:.3f} (<= {r['threshold_ma']:.3f})  EL{r['el_n']} {r['el']:.3f} "
            f"(<= {r['threshold_el']:.3f}){extra}  {'PASS' if r['forgotten'] else 'FAIL'} {mark}  [{who}]")
