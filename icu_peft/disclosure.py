"""What a shipped forget adapter may say about the text it forgot.

A forget adapter is a file handed to others: vendors, serving engines, auditors. Nothing in its directory
(manifest, report.json, report.md, the model card, the plots) may let someone who holds it, the public base
model and a candidate text confirm that the text was in the request. Any statistic of the forget text, under
the base or under the base with the adapter, is such a test when it is written at full precision: a
candidate whose NLL under the base matches a manifest entry to seven digits, with the same token count, was
in the request. The keyed ids (idkeys.py) were never the only way in.

So the shipped report (`public_report`) keeps, per sample, its keyed id, its verdict, where it sits against
the never-seen band and how long it trained; it drops the per-sample scores, token counts and histories, and
the membership attacks' score lists (their AUCs stay); it rounds every request-level statistic of the forget
text (means over the forget set, the loop's history, the targets, the per-precision means) to `DIGITS`
decimals. For a one-sample request such a mean is the sample's own score: at two decimals it says what the
adapter's verdict says (memorised before, forgotten after) and no longer tells one record from another of
its kind (the kept records of the tiny memorisers spread over tens of hundredths of a nat under the base).
Statistics of the never-seen text (the band, the thresholds) and of the kept text (retain) are not the
request's and stay as they are. The full report stays with the operator: `ForgetResult.report` in Python,
the command's own output.
"""

from __future__ import annotations

import copy
from typing import Any

DIGITS = 2  # decimals of a request-level statistic of the forget text in a shipped report

# per sample: what may be shipped (the keyed id, the verdicts, the training count; no score of the text)
SAMPLE_KEYS = ("id", "forgotten", "band", "epochs_active")
# report sections computed from the forget text (rounded); `history` rows keep their step bookkeeping exact
FORGET_SECTIONS = ("forget", "targets", "calibration", "forget_quality")
HISTORY_EXACT = ("epoch", "step", "active", "lr", "action", "retain_ma")


def rounded(value: Any, digits: int = DIGITS) -> Any:
    """`value` with every float in it (nested dicts and lists) rounded to `digits` decimals."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def public_sample(sample: dict) -> dict:
    """One per-sample row as shipped: no score, no length."""
    return {k: sample[k] for k in SAMPLE_KEYS if k in sample}


def public_mia(mia: Any) -> Any:
    """The attacks' AUC and TPR per stage, rounded; the member / non-member score lists dropped."""
    if not isinstance(mia, dict):
        return mia
    out = {}
    for key, value in mia.items():
        if isinstance(value, dict) and ("members" in value or "auc" in value):
            out[key] = rounded({k: v for k, v in value.items() if k not in ("members", "non_members")})
        else:
            out[key] = public_mia(value) if isinstance(value, dict) else rounded(value)
    return out


def public_report(report: dict) -> dict:
    """A copy of a forget request's report fit to ship with the adapter (see the module docstring)."""
    out = copy.deepcopy(report)
    if isinstance(out.get("samples"), list):
        out["samples"] = [public_sample(s) for s in out["samples"]]
    out.pop("per_sample_history", None)
    if "mia" in out:
        out["mia"] = public_mia(out["mia"])
    for key in FORGET_SECTIONS:
        if key in out:
            out[key] = rounded(out[key])
    # `out` is a copy: the rows and views below are rounded in place
    for row in out.get("history") or []:
        if isinstance(row, dict):
            row.update({k: rounded(v) for k, v in row.items() if k not in HISTORY_EXACT})
    for view in ((out.get("precisions") or {}).get("checked") or {}).values():
        if isinstance(view, dict):
            view.update({k: rounded(view[k]) for k in ("before", "after") if k in view})
    out["disclosure"] = {"per_sample_scores": False, "digits": DIGITS}
    return out


__all__ = ["public_report", "public_sample", "public_mia", "rounded", "DIGITS"]
