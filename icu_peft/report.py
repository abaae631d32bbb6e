"""The per-request report written next to a forget adapter: report.json, report.md and PNG plots.

Everything here is numbers and salted sample ids: the report is built from the manifest dict, which
never holds text. Plots use matplotlib's object API (no pyplot global state); without matplotlib
the PNGs are skipped and report.md says so.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

logger = logging.getLogger("icu_peft")

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_IUR = "iur_per_sample.png"
PLOT_FORGET_RETAIN = "forget_vs_retain.png"
PLOT_MIA = "mia_roc.png"


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out


def _mia_stages(mia: Optional[dict]) -> Dict[str, dict]:
    """{'after': {attack: {...}}, ...} from either a staged or a single-stage MIA section."""
    if not mia:
        return {}
    if any(k in mia for k in ("before", "after")):
        return {k: v for k, v in mia.items() if k in ("before", "after") and isinstance(v, dict)}
    return {"after": mia}


# ------------------------------------------------------------------------------ plots

def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def plot_iur(report: dict, path: Path) -> Optional[Path]:
    """Per-sample MA and EL_n across IUR epochs (epoch 0 = before), with the 'forgotten' threshold."""
    per = report.get("per_sample_history") or {}
    history = report.get("history") or []
    if not per and not history:
        return None
    th = report.get("thresholds") or {}
    el_n = (report.get("config") or {}).get("el_n", 10)
    fig, axes = _figure(10, 4, 2)
    for ax, key, label in ((axes[0], "ma", "MA"), (axes[1], "el", f"EL{el_n}")):
        if per:
            for sid, series in per.items():
                vals = [float("nan") if v is None else v for v in series.get(key) or []]  # None: lazily skipped
                ax.plot(range(len(vals)), vals, lw=1, alpha=0.6, marker="." if len(vals) < 30 else None)
            title = f"{label} per forget sample ({len(per)})"
        else:
            ep = [h["epoch"] for h in history]
            means = [h.get(f"{key}_mean") for h in history]
            ax.plot(ep, [float("nan") if v is None else v for v in means], lw=2, marker="o", color="C0", label="mean")
            title = f"{label}, mean over the forget set"
        if th.get(key) is not None:
            ax.axhline(th[key], color="black", ls="--", lw=1.2, label=f"threshold {th[key]:.3f}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_forget_retain(report: dict, path: Path) -> Optional[Path]:
    """Mean MA and EL_n of the forget set and the retain set, before and after the adapter."""
    f, r = report.get("forget") or {}, report.get("retain") or {}
    if not f.get("before") or not f.get("after"):
        return None
    th = report.get("thresholds") or {}
    el_n = (report.get("config") or {}).get("el_n", 10)
    fig, axes = _figure(9, 4, 2)
    groups = [("forget", f)] + ([("retain", r)] if r.get("before") and r.get("after") else [])
    for ax, key, label in ((axes[0], "ma", "MA"), (axes[1], "el", f"EL{el_n}")):
        xs = list(range(len(groups)))
        w = 0.36
        # None: not measured (the retain set's EL is off by default): no bar, a dash
        before = [g["before"].get(key) for _, g in groups]
        after = [g["after"].get(key) for _, g in groups]
        nan = float("nan")
        ax.bar([x - w / 2 for x in xs], [nan if b is None else b for b in before], w, label="before", color="C7")
        ax.bar([x + w / 2 for x in xs], [nan if a is None else a for a in after], w, label="after", color="C0")
        for x, b, a in zip(xs, before, after):
            ax.text(x - w / 2, (b or 0) + 0.01, "-" if b is None else f"{b:.2f}", ha="center", fontsize=8)
            ax.text(x + w / 2, (a or 0) + 0.01, "-" if a is None else f"{a:.2f}", ha="center", fontsize=8)
        if th.get(key) is not None:
            ax.axhline(th[key], color="black", ls="--", lw=1.2, label="threshold")
        ax.set_xticks(xs)
        ax.set_xticklabels([n for n, _ in groups])
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(label)
        ax.set_title(f"{label}: forget vs retain", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_mia(report: dict, path: Path) -> Optional[Path]:
    """ROC curves of each membership-inference attack (forget samples vs unseen text)."""
    from .mia import roc_curve

    stages = _mia_stages(report.get("mia"))
    curves = []
    for stage, attacks in stages.items():
        for attack, r in attacks.items():
            if isinstance(r, dict) and r.get("members") and r.get("non_members"):
                curves.append((stage, attack, r))
    if not curves:
        return None
    fig, (ax,) = _figure(5, 5)
    colors = {}
    for stage, attack, r in curves:
        fpr, tpr = roc_curve(r["members"], r["non_members"])
        c = colors.setdefault(attack, f"C{len(colors)}")
        ax.plot(fpr, tpr, color=c, ls="--" if stage == "before" else "-", lw=1.5,
                label=f"{attack} {stage} (AUC {r.get('auc', float('nan')):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls=":", label="chance (AUC 0.5)")
    ax.set_xlabel("false positive rate (unseen flagged as member)")
    ax.set_ylabel("true positive rate (forget sample flagged)")
    ax.set_title("membership inference ROC", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path)
    return path


# ------------------------------------------------------------------------------ markdown

def render_markdown(report: dict, plots: Sequence[str] = (), plot_note: Optional[str] = None) -> str:
    """report.md: the request, the result, per-sample scores (ids only), history and evaluations."""
    el_n = (report.get("config") or {}).get("el_n", 10)
    L: List[str] = [f"# Forget request {report.get('request_id', '?')}", ""]
    base = report.get("base") or {}
    f, r, th = report.get("forget") or {}, report.get("retain") or {}, report.get("thresholds") or {}
    L += [f"- status: **{report.get('status', '?')}**",
          f"- method: {report.get('method', '?')}; created {report.get('created_at', '?')}",
          f"- base: `{base.get('name_or_path', '?')}` (4-bit: {_fmt(base.get('quantized'))}, fingerprint "
          f"`{str((base.get('fingerprint') or {}).get('sha256', '?'))[:12]}`)",
          f"- forget set: {f.get('count', '?')} samples, {f.get('forgotten', '?')} forgotten; "
          f"{report.get('epochs', '?')} epochs, {report.get('steps', '?')} steps, {_fmt(report.get('wall_time_s'), 1)} s, "
          f"peak RSS {_fmt(report.get('peak_rss_mb'), 0)} MB",
          f"- thresholds ({th.get('source', '?')}): MA <= {_fmt(th.get('ma'))}, EL{el_n} <= {_fmt(th.get('el'))}", ""]
    if f.get("before"):
        rows = [["forget", "before", f["before"].get("ma"), f["before"].get("el")],
                ["forget", "after", (f.get("after") or {}).get("ma"), (f.get("after") or {}).get("el")]]
        if r.get("before"):
            rows += [["retain", "before", r["before"].get("ma"), r["before"].get("el")],
                     ["retain", "after", (r.get("after") or {}).get("ma"), (r.get("after") or {}).get("el")]]
        L += ["## Forget vs retain (means)", ""] + _table(["set", "when", "MA", f"EL{el_n}"], rows) + [""]
    stages = _mia_stages(report.get("mia"))
    if stages:
        rows = []
        for stage, attacks in stages.items():
            for attack, v in attacks.items():
                if isinstance(v, dict):
                    rows.append([stage, attack, v.get("auc"), v.get("tpr_at_5fpr")])
        L += ["## Membership inference (forget samples vs unseen text)", "",
              "ROC-AUC 0.5 = an attacker cannot tell the forget samples from text the model never saw.", ""]
        L += _table(["when", "attack", "ROC-AUC", "TPR at 5% FPR"], rows) + [""]
    samples = report.get("samples") or []
    if samples:
        # a shipped report has no per-sample scores (disclosure.py); an operator's full report has them
        L += ["## Samples (keyed ids, no text)", ""]
        if all("before" in s and "after" in s for s in samples):
            rows = [[s.get("id"), s.get("tokens"), s["before"].get("ma"), s["after"].get("ma"), s["before"].get("el"),
                     s["after"].get("el"), s.get("forgotten"), s.get("epochs_active")] for s in samples]
            L += _table(["id", "tokens", "MA before", "MA after", f"EL{el_n} before", f"EL{el_n} after", "forgotten",
                         "epochs active"], rows) + [""]
        else:
            rows = [[s.get("id"), s.get("forgotten"), s.get("band"), s.get("epochs_active")] for s in samples]
            L += _table(["id", "forgotten", "against the never-seen band", "epochs active"], rows)
            L += ["", "Per-sample scores are not shipped: with the public base they would confirm a candidate text "
                      "was in the request.", ""]
    history = report.get("history") or []
    if history:
        L += ["## IUR history (means over the forget set)", ""]
        rows = [[h.get("epoch"), h.get("active"), h.get("loss"), h.get("ma_mean"), h.get("el_mean")] for h in history]
        L += _table(["epoch", "active", "loss", "MA", f"EL{el_n}"], rows) + [""]
    ev = report.get("evaluation")
    if ev:
        L += ["## Evaluation", "", "```json", json.dumps(ev, indent=2, default=str), "```", ""]
    if plots or plot_note:
        L += ["## Plots", ""]
        L += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
        if plot_note:
            L.append(plot_note)
        L.append("")
    return "\n".join(L)


# ------------------------------------------------------------------------------ entry point

def precisions_line(report: dict) -> str:
    """Where forgetting was checked (the manifest's `precisions`), in one line."""
    prec = report.get("precisions") or {}
    checked = prec.get("checked") or {}
    count = (report.get("forget") or {}).get("count")
    names = {"nf4": "the 4-bit base", "nf4_merged": "merged and reloaded in NF4"}
    if not checked:
        return "not recorded"
    text = ", ".join(f"{names.get(k, 'the ' + k + ' base (merged)')} {v['forgotten']}/{count}" for k, v in checked.items())
    if len(checked) == 1 and prec.get("full_precision_skipped"):
        text += f"; full precision not checked ({prec['full_precision_skipped']})"
    return text


def model_card(report: dict) -> str:
    """The adapter's README.md, from the manifest: what it is, how to load and check it. No sample text."""
    base = report.get("base") or {}
    fgt = report.get("forget") or {}
    band = report.get("band") or {}
    ret = report.get("retain") or {}
    lines = [
        "---",
        "library_name: peft",
        "tags: [icu-peft, machine-unlearning, forget-adapter, lora]",
        "---",
        "",
        f"# Forget adapter `{report.get('request_id')}`",
        "",
        "A LoRA adapter made by icu-peft for one forget request: attached to its base "
        "model, the model no longer reproduces the request's samples (they score like text it never saw).",
        "This directory holds no text of the request; samples are identified by keyed hashes only.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base.get('name_or_path')}`{' / ' + base['gguf_file'] if base.get('gguf_file') else ''} "
        f"({'4-bit NF4' if base.get('quantized') else 'full precision'}) |",
        f"| status | **{report.get('status')}**: {fgt.get('forgotten')} of {fgt.get('count')} samples forgotten |",
        f"| method | {report.get('method')}, {report.get('steps')} optimizer steps |",
        f"| created | {report.get('created_at')} |",
    ]
    if band:
        lines.append(f"| never-seen band | NLL {band.get('nll_lo', 0):.3f} .. {band.get('nll_hi', 0):.3f} "
                     f"({band.get('count')} never-seen samples) |")
    if ret.get("before") and ret.get("after"):
        lines.append(f"| retain MA | {ret['before']['ma']:.3f} -> {ret['after']['ma']:.3f} |")
    lines.append(f"| forgotten in | {precisions_line(report)} |")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        f"model = PeftModel.from_pretrained(base_model, \"PATH/TO/THIS/DIRECTORY\")",
        "```",
        "",
        "## Check",
        "",
        "```bash",
        "icu-peft inspect DIR                                   # files, manifest digest, scores",
        "icu-peft verify --model BASE --adapter DIR --forget F  # re-score a forget set (operator, or auditor with --id-key)",
        "icu-peft verify ... --public-key KEY.pub               # if the operator signed it (icu-peft sign)",
        "```",
        "",
        "Details: `report.md` and `forget_manifest.json` in this directory.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, directory: str | Path) -> List[Path]:
    """Write report.json, report.md and the PNG plots into `directory`; return the paths written.

    Call it inside the adapter's temporary directory before the manifest is written, so that every
    report file is hashed into the manifest with the adapter weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in report.items() if k != "files"}
    written: List[Path] = []
    plots: List[Path] = []
    note = None
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        note = "(PNG plots skipped: matplotlib is not installed; `pip install 'icu-peft[report]'`.)"
        logger.warning("matplotlib is not installed: report without plots")
    if note is None:
        for fn, name in ((plot_iur, PLOT_IUR), (plot_forget_retain, PLOT_FORGET_RETAIN), (plot_mia, PLOT_MIA)):
            try:
                p = fn(body, directory / name)
            except Exception as e:  # a plot must never cost the user the adapter
                logger.warning("plot %s skipped: %s", name, e)
                p = None
            if p is not None:
                plots.append(p)
    card = directory / "README.md"  # replaces PEFT's unfilled model-card template
    card.write_text(model_card(body))
    written.append(card)
    js = directory / REPORT_JSON
    js.write_text(json.dumps(body, indent=2, default=_json_default, allow_nan=True) + "\n")
    md = directory / REPORT_MD
    md.write_text(render_markdown(body, [p.name for p in plots], note))
    written += [js, md] + plots
    return written


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


__all__ = ["write_report", "render_markdown", "plot_iur", "plot_forget_retain", "plot_mia"]
