"""The demo, end to end: plant private records, file an erasure request, forget, show before/after.

    run_demo(DemoOptions(quick=True))  ->  report dict (also written to OUT/demo_report.json)

Everything is measured on the same footing before and after: the 4-bit base with and without the
forget adapter, scored by the library's own MA / EL_n and by a greedy-decoding extraction attack on
each person's secrets. The report holds counts and means only, never a record's text or a name.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..config import ICUConfig
from ..errors import ICUError, OutputExistsError
from .plant import PlantSettings, extract_secrets, planted_dir, read_plant_info
from .records import DemoCorpus, Probe, make_corpus

logger = logging.getLogger("icu_peft")

REPORT_NAME = "demo_report.json"
ADAPTER_SUBDIR = "forget-adapter"
SHARED_WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "validation" / "wikitext.csv"

# General prose for the perplexity check when ../shared is absent (a user's clone). Written for this
# project; plain encyclopedic English unrelated to the records.
BUILTIN_GENERAL_TEXT = (
    "The river rises in the hills north of the town and flows south for about forty kilometres before it "
    "joins the sea. In the nineteenth century its banks were lined with mills that used the current to grind "
    "grain and saw timber, and several of the old buildings still stand today.",
    "Bees collect nectar and pollen from flowers. The nectar is stored in the hive and slowly turns into honey "
    "as water evaporates from it, while the pollen is mixed with a little honey and fed to the young.",
    "A bicycle is driven by pedals that turn a chain, which in turn drives the rear wheel. Gears of different "
    "sizes let the rider choose between climbing steep hills with little effort and moving fast on flat roads.",
    "The library was founded in 1892 with a gift of two thousand books. It moved into its present building in "
    "1931, and the reading room, with its tall windows and long oak tables, is open to the public every day.",
    "Bread is made by mixing flour, water, salt and yeast into a dough. The yeast feeds on sugars in the flour "
    "and releases gas, which makes the dough rise; baking then sets the structure and browns the crust.",
    "The planet takes about twelve Earth years to go around the Sun. It has no solid surface, and its thick "
    "atmosphere is made mostly of hydrogen and helium, with bands of cloud that move in opposite directions.",
    "Chess is played on a board of sixty-four squares. Each player starts with sixteen pieces, and the aim of "
    "the game is to attack the opposing king so that it cannot escape capture.",
    "Rain forms when water vapour in the air cools and condenses around tiny particles of dust. The droplets "
    "grow as they collide and merge, and when they become too heavy to stay aloft they fall to the ground.",
)


@dataclass
class DemoOptions:
    """Sizes and settings of one demo run (measured times: docs/BENCHMARKS.md)."""

    num_people: int = 20
    num_unseen: int = 8
    forget_fraction: float = 0.1
    seed: int = 0
    output_dir: Path = Path("icu-peft-demo")
    overwrite: bool = False
    plant: PlantSettings = field(default_factory=lambda: demo_plant_settings())
    icu: Dict = field(default_factory=dict)  # ICUConfig overrides on top of demo_icu_config()
    general_texts: int = 16
    progress: bool = True
    cache_dir: Optional[Path] = None

    @classmethod
    def quick(cls, **kw) -> "DemoOptions":
        """A smaller run for CI's smoke test: fewer people, fewer epochs."""
        base = dict(num_people=12, num_unseen=5, forget_fraction=0.17, general_texts=6)
        base.update(kw)
        return cls(**base)


def demo_plant_settings(**overrides) -> PlantSettings:
    """Planting sized for a short first run on 2 CPU cores (its times: docs/CHANGELOG.md, docs/DEMO.md):
    the top 10 of SmolLM2's 30 layers, lr 1e-3; about 15 epochs memorise every secret."""
    base = dict(learning_rate=1e-3, train_top_layers=10, batch_size=4, min_epochs=6, check_every=3,
                extra_epochs=2, max_epochs=40)
    base.update(overrides)
    return PlantSettings(**base)


def demo_icu_config(**overrides) -> ICUConfig:
    """ICU settings for the demo's records (a handful of short forget samples, 4-bit SmolLM2).

    The method, its step size and its stop are the library defaults (calibrated forgetting: targets
    inside the never-seen band, learning rate found during training). Only the model's shape is set
    here: LoRA in the last 10 layers (the frozen-prefix cache then skips 20 of 30 layers per step),
    records of at most 128 tokens, and the forget term's targets only on tokens not shared with the
    kept records (their template stays as the base has it). And the step's second pass goes through the
    precision view furthest from the band (`view_schedule: lag`): on SmolLM2 the full-precision view
    forgot 0.5-0.6 nats behind the 4-bit one with the passes in turn, half the never-seen band's width,
    and a quick demo with them in turn had neither record inside the band at step 48; with `lag` the views
    stayed within 0.1-0.25 nats and it finished in 80 steps (docs/CHANGELOG.md, "Every view held"; on
    the tiny memorisers `lag` was worse, so the library's default stays `turns`). And the steps take their
    blocks from the heap from the first one (`cpu_heap_steps: true`; the library's `auto` measures one step
    first, then decides the same on any machine the demo fits): 0.57x a step's time for 13% more peak memory.
    And the hardest fifth is not steered (`tail_attacks: ''`): 2 records against 5 never-planted people move
    a Min-K% AUC in steps of 0.1; with the library's default the request went on from step 64 (the loss attack
    at 0.50) to 88, kept secrets the same 68 of 72, the loss attack at 0.44, 8:52 wall cached (7:36 on session
    26's code, the same machine; docs/CHANGELOG.md, "The hardest fifth").
    """
    base = dict(forget_distinct_ngram=4, lora_layers=10, seed=0, progress=True, el_n=10, max_length=128,
                view_schedule="lag", cpu_heap_steps=True, tail_attacks="")
    base.update(overrides)
    return ICUConfig(**base)


# ------------------------------------------------------------------------------ measurements

def general_texts(limit: int = 16, max_chars: int = 700) -> List[str]:
    """General prose for perplexity: WikiText from ../shared when present, else the built-in paragraphs."""
    if SHARED_WIKITEXT.is_file():
        csv.field_size_limit(1 << 30)
        with open(SHARED_WIKITEXT, newline="", encoding="utf-8") as f:
            rows = [(r.get("text") or "").strip() for r in csv.DictReader(f)]
        texts = [" ".join(r.split())[:max_chars] for r in rows if len(r) > 200]
        if texts:
            return texts[:limit]
    return list(BUILTIN_GENERAL_TEXT[:limit])


def general_text_source() -> str:
    return "wikitext (../shared)" if SHARED_WIKITEXT.is_file() else "built-in paragraphs"


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int = 160, batch_size: int = 8) -> float:
    """Token-weighted perplexity of `texts` (each truncated to max_length tokens)."""
    from ..metrics import teacher_forced

    total, count = 0.0, 0
    seqs = [torch.tensor(tokenizer(t)["input_ids"][:max_length], dtype=torch.long) for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    for s in range(0, len(seqs), batch_size):
        tf = teacher_forced(model, seqs[s:s + batch_size], tokenizer.pad_token_id)
        v = tf.valid
        total += float(-(tf.target_logprobs * v).sum())
        count += int(v.sum())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def measure_group(model, tokenizer, texts: Sequence[str], probes: Sequence[Probe], el_n: int = 10,
                  batch_size: int = 16, el: bool = True, scores: Optional[tuple] = None, el_start: int = 1,
                  desc: Optional[str] = None) -> dict:
    """Mean MA and EL_n of `texts`, and how many of the probes' secrets greedy decoding extracts.

    el=False skips EL_n (None in the result): on text the model no longer reproduces it costs a
    greedy roll-out per position, minutes per group on a CPU. `scores` = (MA list, EL list) already
    measured on this model for these texts (then only the secrets are extracted here).
    """
    from ..metrics import score_samples

    model.eval()
    if scores is None:
        seqs = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long) for t in texts]
        # one bar per group when `desc` is given: EL_n roll-outs make this minutes long on a CPU
        bar = _group_bar(len(seqs), desc)
        try:
            s = score_samples(model, seqs, tokenizer.pad_token_id, el_n=el_n, el_start=el_start, batch_size=min(
                batch_size, 4) if bar is not None else batch_size, el_max_ma=None if el else -1.0, progress=bar)
        finally:
            if bar is not None:
                bar.close()
        ma, el_values = s.ma, s.el
    else:
        ma, el_values = scores
    hits = extract_secrets(model, tokenizer, probes)
    els = [e for e in el_values if e is not None]
    return {"count": len(texts), "ma": sum(ma) / len(ma), "el": sum(els) / len(els) if els else None,
            "ma_max": max(ma), "el_max": max(els) if els else None, "secrets": sum(hits),
            "secrets_total": len(hits)}


def _group_bar(total: int, desc: Optional[str]):
    if not desc:
        return None
    from tqdm.auto import tqdm

    from ..unlearner import BAR_FORMAT

    return tqdm(total=total, desc=desc, unit="text", leave=False, bar_format=BAR_FORMAT)


def measure_all(model, tokenizer, corpus: DemoCorpus, general: Sequence[str], el_n: int = 10,
                unseen: bool = True, forgotten_scores: Optional[tuple] = None, progress: bool = False,
                kept_scores: Optional[tuple] = None) -> dict:
    """Both groups and the perplexity; `forgotten_scores` ((MA list, EL list) of the forget texts, e.g.
    from the forget report) spares re-scoring them: EL_n of forgotten text is the costliest measurement.
    `kept_scores` likewise for the kept people's texts."""
    out = {"forgotten": measure_group(model, tokenizer, corpus.forget_texts, corpus.probes(corpus.forget_people), el_n,
                                      scores=forgotten_scores, desc="scoring people to forget" if progress else None),
           "kept": measure_group(model, tokenizer, corpus.retain_texts, corpus.probes(corpus.kept_people), el_n,
                                 scores=kept_scores, desc="scoring people to keep" if progress else None),
           "perplexity": perplexity(model, tokenizer, general)}
    if unseen:
        out["unseen"] = measure_group(model, tokenizer, corpus.unseen_texts, corpus.probes(corpus.unseen), el_n,
                                      desc="scoring never-planted people" if progress else None)
    return out


def base_scores(model, tokenizer, texts: Sequence[str], config: ICUConfig, progress: bool = False,
                desc: str = "scoring") -> Optional[tuple]:
    """(MA list, EL list) of `texts` on the untouched planted base, remembered as the never-planted people's
    scores are (unlearner.never_seen_scores: the planted weights' hashes, the token ids, the settings; numbers
    only): a cached run reads them instead of rolling out again (the default demo's 18 kept people: ~50 s of
    EL_10 roll-outs on 2 threads before the request, partly memorised text deviating here and there). None
    where a request would tokenize a text otherwise than measure_group does (cut at max_length)."""
    from ..data import new_salt
    from ..models import base_fingerprint
    from ..unlearner import never_seen_scores, never_seen_tokens

    tset = never_seen_tokens(texts, tokenizer, config, salt=new_salt())
    if [x.tolist() for x in tset.input_ids] != [tokenizer(t)["input_ids"] for t in texts]:
        return None
    s = never_seen_scores(model, tset, tokenizer.pad_token_id, config, base_fingerprint(model), progress=progress,
                          desc=desc)
    return s.ma, s.el


def unseen_level(model, tokenizer, corpus: DemoCorpus, config: ICUConfig, progress: bool = False) -> tuple:
    """(the never-planted people's scores on the 4-bit planted model, whether they came from the cache).

    EL_n of text the model never saw needs a greedy roll-out at every position, the costliest measurement
    of the demo. The people are scored as the forget request scores its never-seen text
    (unlearner.never_seen_scores) and remembered under the same key (the planted weights' hashes, the
    token ids, the settings; numbers only, in the icu-peft cache): the request then reads them instead of
    rolling out again, and later runs skip the roll-outs altogether. Only the secrets are extracted here
    each time (a few greedy decodes).
    """
    from ..data import new_salt
    from ..models import base_fingerprint
    from ..unlearner import never_seen_scores, never_seen_tokens

    # the salt names samples in reports only; the remembered scores are keyed by token ids
    tset = never_seen_tokens(corpus.unseen_texts, tokenizer, config, salt=new_salt())
    fresh: list = []
    scores = never_seen_scores(model, tset, tokenizer.pad_token_id, config, base_fingerprint(model),
                               progress=progress, computed=fresh, desc="scoring never-planted people (once; cached)")
    level = measure_group(model, tokenizer, corpus.unseen_texts, corpus.probes(corpus.unseen), config.el_n,
                          scores=(scores.ma, scores.el))
    return level, not fresh


def _logical_numel(p) -> int:
    """Parameters a tensor stands for: a bitsandbytes 4-bit tensor packs two per byte, its numel() is half."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else p.numel()


def directory_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(f"*{suffix}") if p.is_file())


# ------------------------------------------------------------------------------ planting (in a child process)

def ensure_planted(corpus: DemoCorpus, settings: PlantSettings, root: Optional[Path] = None,
                   progress: bool = True) -> tuple:
    """(planted directory, seconds spent planting now or None when cached).

    Planting runs in a child process (`python -m icu_peft.demo.plant`) so its ~4 GB of fp32 weights
    and Adam state go back to the system, and the demo's peak-memory figure is the forget request's.
    """
    import subprocess
    import sys

    d = planted_dir(corpus.texts, settings, root)
    if read_plant_info(d) is not None:
        return d, None
    t0 = time.time()
    spec = {"corpus": corpus.settings, "settings": asdict(settings), "root": str(root) if root else None,
            "progress": progress}
    proc = subprocess.run([sys.executable, "-m", "icu_peft.demo.plant", json.dumps(spec)])
    if proc.returncode != 0 or read_plant_info(d) is None:
        raise ICUError(f"planting the records failed (exit code {proc.returncode}); see the messages above")
    return d, time.time() - t0


# ------------------------------------------------------------------------------ lifecycle

def merged_secrets(planted: Path, adapter_dir: Path, corpus: DemoCorpus) -> dict:
    """Merge the adapter into the planted model (float32, as `icu-peft merge` does); count what still leaks.

    The merged model stays in memory (lifecycle.merged_in_memory) and is dropped: the demo only shows
    that merging keeps the forgetting; `icu-peft merge` writes one to keep.
    """
    from ..lifecycle import merged_in_memory
    from ..models import load_tokenizer

    tok = load_tokenizer(str(planted))
    merged = merged_in_memory(planted, [adapter_dir])
    f = extract_secrets(merged, tok, corpus.probes(corpus.forget_people))
    k = extract_secrets(merged, tok, corpus.probes(corpus.kept_people))
    del merged
    return {"forgotten_secrets": sum(f), "forgotten_total": len(f), "kept_secrets": sum(k), "kept_total": len(k)}


# ------------------------------------------------------------------------------ the demo

def _prepare_output(out: Path, overwrite: bool) -> None:
    """A previous demo's output is replaced silently; anything else needs --overwrite."""
    if out.exists() and out.is_dir() and any(out.iterdir()) and not overwrite:
        if not (out / REPORT_NAME).is_file():
            raise OutputExistsError(f"output directory exists and is not a previous demo's: {out} (use --overwrite)")


def run_demo(opts: DemoOptions, say: Callable[[str], None] = print) -> dict:
    """Run the whole demo and return its report (also written to OUT/demo_report.json)."""
    from ..dequant import dense_weights
    from ..models import load_base_model, load_tokenizer
    from ..precision import view_bytes

    t_start = time.time()
    out = Path(opts.output_dir)
    _prepare_output(out, opts.overwrite)
    corpus = make_corpus(opts.num_people, opts.num_unseen, opts.forget_fraction, opts.seed)
    cfg = demo_icu_config(**{"progress": opts.progress, **opts.icu})
    nf = len(corpus.forget_index)
    say(f"icu-peft demo: {opts.num_people} fictitious customers planted into SmolLM2-135M-Instruct; "
        f"{nf} of them file an erasure request.")

    root = Path(opts.cache_dir) if opts.cache_dir else None
    planted = planted_dir(corpus.texts, opts.plant, root)
    if read_plant_info(planted) is None:
        say(f"[1/4] planting the records (first run only; cached in {planted.parent}) ...")
    planted, plant_s = ensure_planted(corpus, opts.plant, root, opts.progress)
    info = read_plant_info(planted)
    say(f"[1/4] planted model: {planted}" + (f" (planted in {plant_s:.0f} s)" if plant_s else " (cached)"))

    say("[2/4] loading it on a 4-bit NF4 base and measuring what leaks ...")
    tok = load_tokenizer(str(planted))
    base = load_base_model(str(planted), quantize=True)
    # every phase below runs this frozen base: dequantize its 4-bit weights once (dequant.py), leaving
    # room for the request's full-precision view
    device = next(base.parameters()).device
    with dense_weights(base, cfg.dequant_cache_mb, device, reserve=view_bytes(cfg, base, device)):
        return _run_on_base(opts, say, t_start, out, corpus, cfg, planted, plant_s, info, tok, base)


def _run_on_base(opts: DemoOptions, say, t_start: float, out: Path, corpus, cfg, planted: Path, plant_s, info: dict,
                 tok, base) -> dict:
    """run_demo's steps 2-4 on the loaded 4-bit base."""
    from ..adapters import atomic_output_dir
    from ..unlearner import forget

    nf = len(corpus.forget_index)
    general = general_texts(opts.general_texts)
    t0 = time.time()
    before = measure_all(base, tok, corpus, general, cfg.el_n, unseen=False, progress=opts.progress,
                         forgotten_scores=base_scores(base, tok, corpus.forget_texts, cfg, opts.progress,
                                                      "scoring people to forget (once; cached)"),
                         kept_scores=base_scores(base, tok, corpus.retain_texts, cfg, opts.progress,
                                                 "scoring people to keep (once; cached)"))
    before["unseen"], cached = unseen_level(base, tok, corpus, cfg, progress=opts.progress)
    measure_s = time.time() - t0
    # The request measures its own never-seen band from the same people, as it does for a user (one token
    # of MA slack, the chance allowance for the MA / EL_n edges), reading the scores just remembered rather
    # than rolling out again. With the never-planted maxima passed as explicit thresholds instead (no
    # allowance), a quick demo's two records sat inside the band's NLL and under its MA edge from step 56
    # and still counted "outside the target" to step 76, the learning rate halved to its floor (2026-12-06).
    # the loaded base is passed in; the path lets the request load its full-precision view (precision.py)
    cfg = dataclasses.replace(cfg, model=cfg.model or str(planted))

    say(f"[3/4] forgetting {nf} people with ICU into a LoRA forget adapter ...")
    with atomic_output_dir(out, overwrite=True) as tmp:
        adapter_dir = tmp / ADAPTER_SUBDIR
        res = forget(cfg, corpus.forget_texts, corpus.retain_texts, corpus.unseen_texts,
                     output_dir=adapter_dir, base_model=base, tokenizer=tok)
        icu_report = res.report
        model = res.model
        # The forget report scored the forget texts on this very model (same tokens, eval mode): reuse them.
        rows = icu_report["samples"]
        if [r["tokens"] for r in rows] != [len(tok(t)["input_ids"]) for t in corpus.forget_texts]:
            rows = None  # truncated by max_length: score them here on the whole texts
        final = ([r["after"]["ma"] for r in rows], [r["after"]["el"] for r in rows]) if rows else None
        after = measure_all(model, tok, corpus, general, cfg.el_n, unseen=False, forgotten_scores=final,
                            progress=opts.progress)
        say("[4/4] lifecycle: detaching and merging the adapter ...")
        with model.disable_adapter():
            detached = extract_secrets(model, tok, corpus.probes(corpus.forget_people))
        merged = merged_secrets(planted, adapter_dir, corpus)
        adapter_bytes = directory_bytes(adapter_dir)
        base_params = sum(_logical_numel(p) for p in model.get_base_model().parameters()) - sum(
            p.numel() for n, p in model.named_parameters() if "lora_" in n)
        report = {
            "format": "icu-peft/demo-report/v1",
            "corpus": corpus.settings,
            "planted_model": str(planted),
            "plant": {k: info.get(k) for k in ("epochs", "memorised_at_epoch", "secrets_leaked", "secrets_total",
                                               "wall_time_s", "settings")},
            "plant_wall_time_s_this_run": round(plant_s, 1) if plant_s else None,
            "icu_config": {k: v for k, v in cfg.to_dict().items() if k != "hash_salt"},
            "general_text": general_text_source(),
            "before": before,
            "after": after,
            "unseen_level": before["unseen"],
            "unseen_level_cached": cached,
            "thresholds": icu_report["thresholds"],
            "icu": {k: icu_report[k] for k in ("status", "epochs", "steps", "wall_time_s", "peak_rss_mb")},
            "forgotten_samples": f"{icu_report['forget']['forgotten']}/{icu_report['forget']['count']}",
            "calibration": icu_report.get("calibration"),
            # loss-attack AUC of the forgotten people's records against never-planted people's (0.5 = chance)
            "mia_auc": ({k: icu_report["mia"][k]["loss"]["auc"] for k in ("before", "after")}
                        if icu_report.get("mia") else None),
            "detached": {"forgotten_secrets": sum(detached), "forgotten_total": len(detached)},
            "merged": merged,
            "adapter_bytes": adapter_bytes,
            "base_bf16_bytes": int(base_params) * 2,
            "measure_before_s": round(measure_s, 1),
            "adapter_dir": str(out / ADAPTER_SUBDIR),
        }
        report["total_wall_time_s"] = round(time.time() - t_start, 1)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    report["report_path"] = str(out / REPORT_NAME)
    say("")
    say(format_table(report))
    return report


def _pct(a: int, b: int) -> str:
    return f"{a}/{b}"


def format_table(r: dict) -> str:
    """The before/after table and the lifecycle lines, as printed by `icu-peft demo`."""
    b, a, u = r["before"], r["after"], r["unseen_level"]
    th = r["thresholds"]
    lines = []
    w = 30

    def row(label, x, y, z=""):
        lines.append(f"  {label:<{w - 2}}{x:>12}{y:>12}{z:>16}")

    lines.append(f"{'':<{w}}{'before':>12}{'after':>12}{'unseen level':>16}")
    for key, title in (("forgotten", "forgotten people"), ("kept", "kept people")):
        lines.append(f"{title} ({b[key]['count']})")
        row("memorisation accuracy (MA)", f"{b[key]['ma']:.3f}", f"{a[key]['ma']:.3f}", f"{u['ma']:.3f}")
        row("extraction likelihood EL10", f"{b[key]['el']:.3f}", f"{a[key]['el']:.3f}", f"{u['el']:.3f}")
        row("secrets extracted", _pct(b[key]["secrets"], b[key]["secrets_total"]),
            _pct(a[key]["secrets"], a[key]["secrets_total"]), _pct(u["secrets"], u["secrets_total"]))
    lines.append(f"general text ({r['general_text']})")
    row("perplexity", f"{b['perplexity']:.2f}", f"{a['perplexity']:.2f}")
    if r.get("mia_auc"):
        lines.append("membership inference, forgotten vs never-seen people")
        row("loss-attack AUC (0.5: chance)", f"{r['mia_auc']['before']:.2f}", f"{r['mia_auc']['after']:.2f}")
    icu = r["icu"]
    lines.append("")
    lines.append(f"forget request: {r['forgotten_samples']} records look never seen (MA <= {th['ma']:.3f}, "
                 f"EL10 <= {th['el']:.3f}); status {icu['status']} after {icu['steps']} optimizer steps")
    plant = f"planting {r['plant_wall_time_s_this_run']:.0f} s, " if r.get("plant_wall_time_s_this_run") else "planting cached, "
    lines.append(f"time: {plant}forget {icu['wall_time_s']:.0f} s, whole demo {r['total_wall_time_s']:.0f} s; "
                 f"peak memory (RSS) {icu['peak_rss_mb']:.0f} MB")
    lines.append(f"adapter: {r['adapter_bytes'] / 2**20:.1f} MB "
                 f"({100 * r['adapter_bytes'] / r['base_bf16_bytes']:.2f}% of the base model's bf16 size)")
    d, m = r["detached"], r["merged"]
    lines.append("")
    lines.append(f"adapter detached -> secrets of the forgotten people extracted: "
                 f"{_pct(d['forgotten_secrets'], d['forgotten_total'])} (revocable: the base is untouched)")
    lines.append(f"adapter merged   -> secrets of the forgotten people extracted: "
                 f"{_pct(m['forgotten_secrets'], m['forgotten_total'])}; kept people's: "
                 f"{_pct(m['kept_secrets'], m['kept_total'])} (permanent)")
    lines.append("")
    lines.append(f"forget adapter: {r['adapter_dir']}")
    lines.append(f"report:         {r['report_path']}")
    return "\n".join(lines)
