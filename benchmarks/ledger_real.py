"""Many forget requests on the real model: independent adapters stacked against the forget ledger.

    OMP_NUM_THREADS=2 python benchmarks/ledger_real.py --work W [--requests 4] [--at 1,2,4] [--json out.json]

SmolLM2-135M-Instruct with the quick demo's 12 customers planted (`--corpus default`: the default demo's 20;
the demo's planted model, cached in the icu-peft cache like the demo's; planted on a first run). The first R
people each file a one-person erasure request, one after another; the others stay, and the demo's 5 (8)
never-planted people are the never-seen text. Every adapter is trained with the demo's settings (`demo_icu_config`: the library's
calibrated defaults, LoRA in the top 10 layers) on the 4-bit base, the stayers as the retain set.

- independent: each request's own adapter, trained on the bare base; at N the first N stacked;
- ledger: each request added to a forget ledger, the served adapter consolidated after each addition
  (warm-started from the last, `icu_peft.ledger.consolidate`);
- cat: the first N independent adapters combined into one (`combine_adapters`, rank 8N).

At each N in --at, for each: the N requests forgotten per sample (`verify_forget_set`, each sample
against its manifest's edges; and inside the never-seen NLL band under the same model), their secrets
extracted, the stayers' MA and secrets, the loss-attack AUC of the N requests against the never-planted
people, and the time of greedy generation (32 new tokens, 8 prompts) with that adapter set. Then request
--revoke is revoked from the ledger and the rest re-consolidated with its text passed to restore: it must
come back to its before level while the others stay forgotten.

Adapters and the ledger are kept in --work: a rerun measures again without training (with a smaller
--requests it reuses what the first run trained, whose retain set was that run's stayers).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

from icu_peft import ledger as L  # noqa: E402
from icu_peft.adapters import read_manifest  # noqa: E402
from icu_peft.calibrate import Band, band_position, loss_auc  # noqa: E402
from icu_peft.demo.plant import extract_secrets  # noqa: E402
from icu_peft.demo.records import make_corpus  # noqa: E402
from icu_peft.demo.run import demo_icu_config, demo_plant_settings, ensure_planted  # noqa: E402
from icu_peft.lifecycle import collect_leaves, combine_adapters, stack_adapters, verify_forget_set  # noqa: E402
from icu_peft.metrics import greedy_continue, score_samples  # noqa: E402
from icu_peft.models import load_base_model, load_tokenizer  # noqa: E402
from icu_peft.unlearner import forget  # noqa: E402

log = logging.getLogger("ledger_real")


def config(planted: Path, name: str, seed: int):
    return demo_icu_config(model=str(planted), progress=False, seed=seed, request_id=name)


CORPORA = {"quick": (12, 5, 0.17, 0), "default": (20, 8, 0.1, 0)}  # make_corpus arguments of the two demos


def people(kind: str = "quick"):
    """The quick demo's 12 people (5 never planted), or the default demo's 20 (8 never planted): the demo's
    planted model is reused."""
    return make_corpus(*CORPORA[kind])


def planted_model(corpus) -> tuple:
    """(planted model directory, tokenizer): `corpus` planted into SmolLM2, from the icu-peft cache (planted on
    a first run, minutes)."""
    planted, _ = ensure_planted(corpus, demo_plant_settings(), progress=False)
    return planted, load_tokenizer(str(planted))


def scores(model, tok, texts):
    """(NLL list, MA list) of `texts`, teacher-forced (no EL_n: roll-outs on forgotten text cost minutes)."""
    seqs = [torch.tensor(tok(t)["input_ids"], dtype=torch.long) for t in texts]
    s = score_samples(model, seqs, tok.pad_token_id, el_max_ma=-1.0)
    return s.nll, s.ma


def latency(model, tok, prompts, new_tokens: int = 32, repeats: int = 3) -> float:
    """Median seconds to greedily decode `new_tokens` after each of `prompts` (one batch)."""
    ctx = [torch.tensor(tok(p)["input_ids"], dtype=torch.long) for p in prompts]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        greedy_continue(model, ctx, [new_tokens] * len(ctx), tok.pad_token_id, batch_size=len(ctx))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def never_seen(model, tok, corpus) -> tuple:
    """(the never-planted people's NLLs, their band) under `model`: what a request is compared with."""
    u_nll, u_ma = scores(model, tok, corpus.unseen_texts)
    lengths = [len(tok(t)["input_ids"]) for t in corpus.unseen_texts]
    return u_nll, Band.from_scores(u_nll, u_ma, None, lengths=lengths)


def request_cells(model, tok, corpus, requests: list, u_nll, band) -> dict:
    """How forgotten the people of `requests` are under `model`, against the never-planted people."""
    texts = [corpus.people[i].text for i in requests]
    leaves = collect_leaves(model) if hasattr(model, "icu_adapters") else []
    # each sample against the edges its own adapter's manifest recorded (EL_n included); none on the base
    v = verify_forget_set(model, tok, texts, leaves) if leaves else None
    f_nll, f_ma = scores(model, tok, texts)
    inside = [band_position(n, m, None, band) == 0 for n, m in zip(f_nll, f_ma)]
    hits = extract_secrets(model, tok, corpus.probes([corpus.people[i] for i in requests]))
    return dict(forgotten_verify=v["summary"]["forgotten"] if v else None, inside_band=sum(inside),
                request_secrets=sum(hits), request_secrets_total=len(hits),
                request_nll=statistics.mean(f_nll), request_ma=statistics.mean(f_ma), loss_auc=loss_auc(f_nll, u_nll))


def evaluate(model, tok, corpus, requests: list, kept: list, prompts, revoked: Optional[int] = None) -> dict:
    """The table's cells for one adapter set serving `requests` (indices into corpus.people); with `revoked`,
    also that person's cells under the same model."""
    model.eval()
    u_nll, band = never_seen(model, tok, corpus)
    row = {"requests": len(requests)}
    if requests:
        row.update(request_cells(model, tok, corpus, requests, u_nll, band))
    if revoked is not None:
        back = request_cells(model, tok, corpus, [revoked], u_nll, band)
        row["revoked"] = {k: back[k] for k in ("request_nll", "request_ma", "request_secrets",
                                               "request_secrets_total", "inside_band")}
    k_nll, k_ma = scores(model, tok, [corpus.people[i].text for i in kept])
    k_hits = extract_secrets(model, tok, corpus.probes([corpus.people[i] for i in kept]))
    row.update(kept_ma=statistics.mean(k_ma), kept_secrets=sum(k_hits), kept_secrets_total=len(k_hits),
               unseen_nll=statistics.mean(u_nll), band=[round(band.nll_lo, 3), round(band.nll_hi, 3)],
               generate_s=round(latency(model, tok, prompts), 3))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, type=Path, help="adapters, the ledger and the results are kept here")
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="quick",
                    help="the people: the quick demo's 12 (5 never planted) or the default demo's 20 (8 never planted)")
    ap.add_argument("--requests", type=int, default=4, help="one-person requests, the first R people (R < the people)")
    ap.add_argument("--at", default="1,2,4", help="the N at which to measure")
    ap.add_argument("--revoke", type=int, default=None, help="request to revoke at the end (default: the middle one)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("icu_peft").setLevel(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    corpus = people(a.corpus)
    R = a.requests
    if not 1 <= R < len(corpus.people):
        ap.error(f"--requests must be between 1 and {len(corpus.people) - 1}")
    at = sorted({int(x) for x in a.at.split(",") if x.strip()})
    requests, kept = list(range(R)), list(range(R, len(corpus.people)))
    revoke = a.revoke if a.revoke is not None else R // 2
    planted, tok = planted_model(corpus)
    kept_texts = [corpus.people[i].text for i in kept]
    prompts = [p.prefix for p in corpus.probes(corpus.people[:8])][:8]
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    load = lambda: load_base_model(str(planted), quantize=True)  # noqa: E731
    results = {"corpus": corpus.settings, "requests": R, "kept": len(kept), "revoke": revoke}

    t0 = time.time()
    base = load()
    results["base"] = evaluate(base, tok, corpus, requests, kept, prompts)
    before_nll, before_ma = scores(base, tok, [corpus.people[i].text for i in requests])  # for the revocation
    del base
    log.info("base: %s (%.0f s)", json.dumps(results["base"]), time.time() - t0)

    # independent adapters, one per request, each on the bare base
    dirs, add_s = [], []
    for i in requests:
        d = work / "independent" / f"req-{i}"
        if not (d / "forget_manifest.json").is_file():
            t0 = time.time()
            forget(config(planted, f"req-{i}", i), [corpus.people[i].text], kept_texts, corpus.unseen_texts,
                   output_dir=d, overwrite=True, base_model=load(), tokenizer=tok)
            (d.parent / f"req-{i}.seconds").write_text(f"{time.time() - t0:.1f}")
        add_s.append(float((d.parent / f"req-{i}.seconds").read_text()))
        dirs.append(d)
        log.info("request %d: %s in %.0f s, %s steps", i, read_manifest(d)["status"], add_s[-1], read_manifest(d)["steps"])
    results["independent_request_s"] = add_s

    # the ledger: add one at a time, consolidate after each
    led = work / "ledger"
    snaps, cons_s = {}, []
    for n in range(1, R + 1):
        snap = work / "ledger-at" / f"N{n}"
        if not (snap / "forget_manifest.json").is_file():
            if not any(r["request_id"] == f"req-{n - 1}" for r in L.read_ledger(led, create=True)["requests"]):
                L.add_request(led, dirs[n - 1])  # a run stopped during this consolidation added it already
            t0 = time.time()
            cfg = config(planted, f"consolidated-{n}", 100 + n)
            L.consolidate(led, cfg, [corpus.people[i].text for i in requests[:n]], kept_texts, corpus.unseen_texts)
            took = time.time() - t0
            if snap.exists():
                shutil.rmtree(snap)
            shutil.copytree(led / L.CONSOLIDATED, snap)
            (snap.parent / f"N{n}.seconds").write_text(f"{took:.1f}")
        cons_s.append(float((snap.parent / f"N{n}.seconds").read_text()))
        snaps[n] = snap
        m = read_manifest(snap)
        log.info("ledger N=%d: %s in %.0f s, %s steps", n, m["status"], cons_s[-1], m["steps"])
    results["consolidate_s"] = cons_s

    for n in at:
        if n > R:
            continue
        row = {}
        row["independent"] = evaluate(stack_adapters(load(), dirs[:n]), tok, corpus, requests[:n], kept, prompts)
        cat = work / "cat" / f"N{n}"
        if not (cat / "forget_manifest.json").is_file():
            combine_adapters(dirs[:n], cat, request_id=f"cat-{n}", overwrite=True)
        row["cat"] = evaluate(stack_adapters(load(), [cat]), tok, corpus, requests[:n], kept, prompts)
        row["ledger"] = evaluate(stack_adapters(load(), [snaps[n]]), tok, corpus, requests[:n], kept, prompts)
        m = read_manifest(snaps[n])
        row["ledger"].update(steps=m["steps"], status=m["status"], rank=m["config"]["lora_r"])
        row["cat"]["rank"] = json.loads((cat / "adapter_config.json").read_text())["r"]  # a combination: 8N
        results[f"N={n}"] = row
        log.info("N=%d: %s", n, json.dumps(row))

    # revoke one request from the full ledger; its text passed to restore
    rv = work / "ledger-revoked"
    rest = [i for i in requests if i != revoke]
    if not (rv / L.CONSOLIDATED / "forget_manifest.json").is_file() or not (rv / "revoke.seconds").is_file():
        if rv.exists():
            shutil.rmtree(rv)
        shutil.copytree(led, rv)
        L.revoke_request(rv, f"req-{revoke}")
        t0 = time.time()
        L.consolidate(rv, config(planted, "consolidated-revoke", 300), [corpus.people[i].text for i in rest],
                      kept_texts, corpus.unseen_texts, restore=[corpus.people[revoke].text])
        (rv / "revoke.seconds").write_text(f"{time.time() - t0:.1f}")
    row = evaluate(stack_adapters(load(), [rv / L.CONSOLIDATED]), tok, corpus, rest, kept, prompts, revoked=revoke)
    row["revoked_before"] = {"nll": before_nll[revoke], "ma": before_ma[revoke]}
    row["revoke_s"] = float((rv / "revoke.seconds").read_text())
    row["status"] = read_manifest(rv / L.CONSOLIDATED)["status"]
    results[f"N={R} minus req-{revoke}"] = row
    log.info("revoked req-%d: %s", revoke, json.dumps(row))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
