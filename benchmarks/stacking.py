"""Stacking quality and 4-bit merge drift on the tiny in-code memoriser (CPU, offline).

    python benchmarks/stacking.py --work /tmp/stacking [--no-quantize] [--sequential] [--joint] [--ledger] [--defaults] [--json out.json]
    python benchmarks/stacking.py --work /tmp/drift --drift-model M --drift-adapter A --drift-adapter B --drift-forget F

1. Builds a tiny Llama that has memorised R x K random records (R requests of K samples) plus a
   retain set, and trains one ICU forget adapter per request, independently (each on the bare
   4-bit base); with --sequential also a second series where request i is trained with adapters
   0..i-1 active and frozen (`forget(..., base_model=stack)`).
2. For N = 1, 2, 4, 8 stacks the first N adapters on the 4-bit base and measures: the share of the
   N requests' samples still forgotten (each against its own manifest's thresholds), their mean
   MA, the retain set's MA (memorised data that must stay) and perplexity on unseen text.
   Then revokes request 0 from the full stack: its MA should come back, the others should stay
   forgotten. With --ledger, the forget ledger instead (icu_peft/ledger.py): requests added one at a
   time, the served adapter re-consolidated after each (warm-started from the last), measured at the
   same N, then request 0 revoked and the rest re-consolidated.
3. --drift-*: given adapters merged three ways (PEFT merge into the 4-bit layers; merge in fp32
   then quantize once; no merge) compared by logits and forget-set MA, plus merge-then-unmerge
   error on one bnb NF4 layer.

Adapters and the model are cached in --work; rerun to re-evaluate without retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
logging.getLogger("transformers").setLevel(logging.ERROR)

from icu_peft import ICUConfig  # noqa: E402
from icu_peft.adapters import read_manifest  # noqa: E402
from icu_peft.data import pad_batch, tokenize_texts  # noqa: E402
from icu_peft.lifecycle import (collect_leaves, merge_adapters, remove_from_stack, stack_adapters,  # noqa: E402
                                verify_forget_set)
from icu_peft.metrics import score_samples  # noqa: E402
from icu_peft.models import load_base_model, load_tokenizer  # noqa: E402
from icu_peft.testing import build_tiny_memorizer, random_sentences  # noqa: E402
from icu_peft.unlearner import forget  # noqa: E402

log = logging.getLogger("stacking")


def corpus(requests: int, per_request: int):
    return {"forget": random_sentences(requests * per_request, seed=11), "retain": random_sentences(16, seed=12),
            "unseen": random_sentences(16, seed=13)}


QUANTIZE = True  # --no-quantize: a full-precision base throughout (about 3x faster on CPU)


DEFAULTS = False  # --defaults: the library's defaults sized for the tiny model (tests/conftest.quick_config)


def config(model_dir: Path, i: int) -> ICUConfig:
    if DEFAULTS:  # calibrated method, learning rate auto, 400-step budget
        return ICUConfig(model=str(model_dir), batch_size=4, retain_kl_samples=12, progress=False, seed=i,
                         request_id=f"req-{i}", quantize=QUANTIZE)
    # the earlier quick settings for the tiny model (fixed rate, 40 epochs): the figures measured before
    return ICUConfig(model=str(model_dir), learning_rate=2e-3, max_epochs=40, batch_size=4, progress=False,
                     score_batch_size=16, seed=i, request_id=f"req-{i}", quantize=QUANTIZE)


def load(model_dir) -> object:
    return load_base_model(str(model_dir), quantize=QUANTIZE)


def request_texts(c: dict, i: int, k: int):
    return c["forget"][i * k:(i + 1) * k]


def train_series(work: Path, model_dir: Path, c: dict, requests: int, k: int, sequential: bool):
    dirs, times = [], []
    name = "seq" if sequential else "ind"
    for i in range(requests):
        out = work / f"{name}_{i}"
        if not out.exists():
            t0 = time.time()
            tok = load_tokenizer(str(model_dir))
            base = load(model_dir)
            if sequential and dirs:
                base = stack_adapters(base, dirs)
                # the loader freezes and names the stack; forget() adds the new adapter beside it
            forget(config(model_dir, i), request_texts(c, i, k), c["retain"], c["unseen"], output_dir=out,
                   base_model=base, tokenizer=tok)
            times.append(time.time() - t0)
            log.info("%s %d trained in %.0f s", name, i, times[-1])
        dirs.append(out)
    return dirs


def joint_table(work: Path, model_dir: Path, c: dict, k: int, ns=(2, 4, 8)) -> dict:
    """The alternative to stacking: one adapter trained on the union of the first N requests."""
    tok = load_tokenizer(str(model_dir))
    out = {}
    for n in ns:
        d = work / f"joint_{n}"
        if not d.exists():
            texts = [t for i in range(n) for t in request_texts(c, i, k)]
            cfg = dataclasses.replace(config(model_dir, 100 + n), request_id=f"joint-{n}")
            forget(cfg, texts, c["retain"], c["unseen"], output_dir=d, base_model=load(model_dir), tokenizer=tok)
        out[f"N={n}"] = evaluate(stack_adapters(load(model_dir), [d]), tok, c, k, list(range(n)))
        out[f"N={n}"]["train_time_s"] = read_manifest(d).get("wall_time_s")
        log.info("joint N=%d: %s", n, json.dumps(out[f"N={n}"]))
    return out


@torch.no_grad()
def perplexity(model, tset, pad_id: int) -> float:
    ids, mask = pad_batch(tset.input_ids, pad_id)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    m = mask[:, 1:].float()
    return math.exp(float((nll * m).sum() / m.sum()))


def evaluate(model, tok, c: dict, k: int, requests_in: list) -> dict:
    leaves = collect_leaves(model) if hasattr(model, "icu_adapters") else []
    texts = [t for i in requests_in for t in request_texts(c, i, k)]
    res = {}
    if texts:
        v = verify_forget_set(model, tok, texts, leaves)
        res["forgotten"] = v["summary"]["forgotten"] / v["summary"]["samples"]
        res["forget_ma"] = v["summary"]["mean_ma"]
    retain = tokenize_texts(c["retain"], tok, 200, "00", name="retain")
    unseen = tokenize_texts(c["unseen"], tok, 200, "00", name="unseen")
    res["retain_ma"] = sum(score_samples(model, retain.input_ids, tok.pad_token_id).ma) / len(retain)
    res["unseen_ppl"] = perplexity(model, unseen, tok.pad_token_id)
    return res


def ledger_table(work: Path, model_dir: Path, c: dict, k: int, dirs: list, ns=(1, 2, 4, 8)) -> dict:
    """Requests added to a forget ledger one at a time; the served adapter consolidated after each."""
    from icu_peft import ledger as L

    tok = load_tokenizer(str(model_dir))
    led = work / "ledger"
    out = {}
    for i, d in enumerate(dirs):
        done = led / f".measured-{i}"
        if not done.exists():
            L.add_request(led, d)
            texts = [t for j in range(i + 1) for t in request_texts(c, j, k)]
            t0 = time.time()
            cfg = dataclasses.replace(config(model_dir, 200 + i), request_id=f"consolidated-{i}")
            L.consolidate(led, cfg, texts, c["retain"], c["unseen"])
            took = time.time() - t0
            if i + 1 in ns:
                row = evaluate(stack_adapters(load(model_dir), [led / "consolidated"]), tok, c, k, list(range(i + 1)))
                row["consolidate_s"] = round(took, 1)
                row["steps"] = read_manifest(led / "consolidated")["steps"]
                out[f"N={i + 1}"] = row
                log.info("ledger N=%d: %s", i + 1, json.dumps(row))
            done.write_text(json.dumps(out.get(f"N={i + 1}")))
        elif i + 1 in ns:
            out[f"N={i + 1}"] = json.loads(done.read_text())
    # revoke request 0 and re-consolidate the rest: it must come back, the others stay forgotten. Twice,
    # from the same ledger: as is, and with request 0's texts passed to restore (held as retain anchors)
    if (led / "requests" / "req-0").exists():
        shutil.copytree(led, work / "ledger-restore", dirs_exist_ok=True)
    for name, where, restore in (("", led, None), (" (restore)", work / "ledger-restore", request_texts(c, 0, k))):
        if not (where / "requests" / "req-0").exists():
            continue
        L.revoke_request(where, "req-0")
        texts = [t for j in range(1, len(dirs)) for t in request_texts(c, j, k)]
        t0 = time.time()
        cfg = dataclasses.replace(config(model_dir, 300), request_id="consolidated-revoke")
        L.consolidate(where, cfg, texts, c["retain"], c["unseen"], restore=restore)
        took = time.time() - t0
        model = stack_adapters(load(model_dir), [where / "consolidated"])
        rest = evaluate(model, tok, c, k, list(range(1, len(dirs))))
        revoked = tokenize_texts(request_texts(c, 0, k), tok, 200, "00")
        rest["revoked_ma"] = sum(score_samples(model, revoked.input_ids, tok.pad_token_id).ma) / len(revoked)
        rest["consolidate_s"] = round(took, 1)
        out[f"N={len(dirs)} minus req-0{name}"] = rest
        log.info("ledger N=%d minus req-0%s: %s", len(dirs), name, json.dumps(rest))
    return out


def stacking_table(model_dir: Path, c: dict, k: int, dirs: list, ns=(1, 2, 4, 8)) -> dict:
    tok = load_tokenizer(str(model_dir))
    out = {"base": evaluate(load(model_dir), tok, c, k, [])}
    all_forget = [t for i in range(len(dirs)) for t in request_texts(c, i, k)]
    base = load(model_dir)
    out["base"]["forget_ma"] = sum(score_samples(base, tokenize_texts(all_forget, tok, 200, "00").input_ids,
                                                 tok.pad_token_id).ma) / len(all_forget)
    alone = [evaluate(stack_adapters(load(model_dir), [d]), tok, c, k, [i]) for i, d in enumerate(dirs)]
    out["alone_mean"] = {key: sum(a[key] for a in alone) / len(alone) for key in alone[0]}
    for n in ns:
        if n <= len(dirs):
            out[f"N={n}"] = evaluate(stack_adapters(load(model_dir), dirs[:n]), tok, c, k,
                                     list(range(n)))
    stack = stack_adapters(load(model_dir), dirs)
    stack = remove_from_stack(stack, "req-0")
    rest = evaluate(stack, tok, c, k, list(range(1, len(dirs))))
    revoked = tokenize_texts(request_texts(c, 0, k), tok, 200, "00")
    rest["revoked_ma"] = sum(score_samples(stack, revoked.input_ids, tok.pad_token_id).ma) / len(revoked)
    out[f"N={len(dirs)} minus req-0"] = rest
    return out


@torch.no_grad()
def drift(work: Path, model_dir: Path, texts: list, dirs: list) -> dict:
    """Merge paths compared with the unmerged 4-bit stack the adapters were trained against."""
    tok = load_tokenizer(str(model_dir))
    tset = tokenize_texts(texts, tok, 200, "00")
    ids, mask = pad_batch(tset.input_ids, tok.pad_token_id)

    def run(model):
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        ma = sum(score_samples(model, tset.input_ids, tok.pad_token_id).ma) / len(tset)
        return logits, ma

    m = mask.bool()
    ref_l, ref_ma = run(stack_adapters(load_base_model(str(model_dir)), dirs))          # 4-bit, unmerged
    fp_l, fp_ma = run(stack_adapters(load_base_model(str(model_dir), quantize=False), dirs))  # fp32, unmerged
    direct = stack_adapters(load_base_model(str(model_dir)), dirs).merge_and_unload()    # PEFT into NF4
    d_l, d_ma = run(direct)
    merged = work / f"merged_{len(dirs)}"
    if not merged.exists():
        merge_adapters(model_dir, dirs, merged)
    once_l, once_ma = run(load_base_model(str(merged)))                                  # fp32 merge, NF4 once
    fp_m_l, fp_m_ma = run(load_base_model(str(merged), quantize=False))                  # fp32 merge, fp32

    def cmp(a):
        d = (a - ref_l).abs()[m]
        kl = torch.nn.functional.kl_div(a.log_softmax(-1)[m], ref_l.log_softmax(-1)[m], log_target=True,
                                        reduction="batchmean")
        return {"max_abs_logit": float(d.max()), "mean_abs_logit": float(d.mean()), "kl_from_ref": float(kl)}

    out = {"adapters": len(dirs), "forget_ma": {"4bit_unmerged": ref_ma, "fp32_unmerged": fp_ma, "4bit_direct_merge": d_ma,
                                                 "fp32_merge_then_4bit": once_ma, "fp32_merge_fp32": fp_m_ma},
           "vs_4bit_unmerged": {"fp32_unmerged": cmp(fp_l), "4bit_direct_merge": cmp(d_l),
                                "fp32_merge_then_4bit": cmp(once_l), "fp32_merge_fp32": cmp(fp_m_l)}}

    # merge then unmerge on one bnb NF4 layer: does it give the original weights back?
    import bitsandbytes.functional as bf

    model = stack_adapters(load_base_model(str(model_dir)), dirs)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w = layer.get_base_layer().weight
    before = bf.dequantize_4bit(w.data, w.quant_state).float().clone()
    layer.merge()
    layer.unmerge()
    w = layer.get_base_layer().weight
    after = bf.dequantize_4bit(w.data, w.quant_state).float()
    out["merge_unmerge_q_proj"] = {"rel_fro_error": float((after - before).norm() / before.norm()),
                                   "max_abs_error": float((after - before).abs().max()),
                                   "changed_fraction": float((after != before).float().mean())}
    return out


def main(argv=None) -> int:
    global QUANTIZE, DEFAULTS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, required=True, help="cache directory (model, adapters, merged models)")
    p.add_argument("--requests", type=int, default=8, help="number of forget requests (max N)")
    p.add_argument("--per-request", type=int, default=2, help="samples per request")
    p.add_argument("--no-quantize", action="store_true", help="full-precision base for the stacking runs")
    p.add_argument("--sequential", action="store_true", help="also train and measure the sequential series")
    p.add_argument("--joint", action="store_true", help="also train one adapter on the union of N requests (N=2,4,8)")
    p.add_argument("--defaults", action="store_true", help="train every adapter with the library defaults (sized for "
                   "the tiny model) instead of the earlier fixed-rate settings")
    p.add_argument("--ledger", action="store_true", help="also run the forget ledger: add one at a time, consolidate after each")
    p.add_argument("--drift-model", type=Path, help="only measure 4-bit merge drift: base model directory")
    p.add_argument("--drift-adapter", type=Path, action="append", default=[], help="adapter (trained on the 4-bit base)")
    p.add_argument("--drift-forget", type=Path, help="their forget samples (.jsonl/.csv/.txt)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 on a busy shared CPU")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("icu_peft").setLevel(logging.WARNING)
    a.work.mkdir(parents=True, exist_ok=True)
    QUANTIZE = not a.no_quantize
    DEFAULTS = a.defaults
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.drift_model:
        from icu_peft.data import read_texts

        texts = read_texts(a.drift_forget)
        ads = a.drift_adapter
        results = {"drift": [drift(a.work, a.drift_model, texts, ads[:n]) for n in range(1, len(ads) + 1)]}
    else:
        results = stacking(a)
    text = json.dumps(results, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


def stacking(a) -> dict:
    c = corpus(a.requests, a.per_request)
    model_dir = a.work / "model"
    if not (model_dir / "model.safetensors").exists():
        t0 = time.time()
        r = build_tiny_memorizer(model_dir, c["forget"] + c["retain"], c["unseen"], steps=400)
        log.info("tiny model: final loss %.4f in %.0f s", r["final_loss"], time.time() - t0)
    results = {"requests": a.requests, "per_request": a.per_request, "quantized": QUANTIZE}
    ind = train_series(a.work, model_dir, c, a.requests, a.per_request, sequential=False)
    results["independent"] = stacking_table(model_dir, c, a.per_request, ind)
    log.info("independent: %s", json.dumps(results["independent"]))
    if a.sequential:
        seq = train_series(a.work, model_dir, c, a.requests, a.per_request, sequential=True)
        results["sequential"] = stacking_table(model_dir, c, a.per_request, seq)
        log.info("sequential: %s", json.dumps(results["sequential"]))
    if a.ledger:
        results["ledger"] = ledger_table(a.work, model_dir, c, a.per_request, ind)
        log.info("ledger: %s", json.dumps(results["ledger"]))
    if a.joint:
        results["joint"] = joint_table(a.work, model_dir, c, a.per_request,
                                       tuple(n for n in (2, 4, 8) if n <= a.requests))
    results["train_time_s"] = {s: [read_manifest(a.work / f"{s}_{i}").get("wall_time_s") for i in range(a.requests)
                                   if (a.work / f"{s}_{i}").exists()] for s in ("ind", "seq")}
    return results


if __name__ == "__main__":
    sys.exit(main())
