"""The evaluation suite: what was forgotten, what was kept, and whether it can come back.

`evaluate` scores a model (with whatever adapter stack it carries) on a text set: MA, EL_n,
perplexity, generated-suffix BLEU, secret extraction and membership inference, each batched and on
the KV cache. `relearn_probe` fine-tunes a throwaway LoRA on part of the forget set and measures
how much of the held-out part comes back. `run_lm_eval` runs EleutherAI lm-eval tasks on the
same model object. Results identify samples by position and salted hash, never by text.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import MAX_CHARS_PER_TOKEN, pad_batch, sample_id
from .errors import InputError
from .metrics import (backbone_and_head, model_device, perplexity, score_samples, secret_extraction, suffix_bleu,
                      teacher_forced)

logger = logging.getLogger("icu_peft")

METRICS = ("ma", "el", "ppl", "bleu", "extraction", "mia")
DEFAULT_METRICS = ("ma", "el", "ppl")


@dataclass
class EvalConfig:
    """Knobs of `evaluate` and `relearn_probe`; the defaults follow ICU / Jang et al."""

    el_n: int = field(default=10, metadata={"help": "n of EL_n."})
    el_start: int = field(default=1, metadata={"help": "Shortest prefix EL_n scores (1: Jang et al.; ICU's code: 150 of 200)."})
    max_length: int = field(default=200, metadata={"help": "MA / EL / BLEU / MIA use the first this many tokens of each text (ICU: 200)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences (or perplexity windows) per forward pass."})
    ppl_window: Optional[int] = field(default=None, metadata={"help": "Perplexity window in tokens (default: the model's context, at most 1024)."})
    ppl_stride: Optional[int] = field(default=None, metadata={"help": "Perplexity window stride (default: half the window)."})
    bleu_prefix: int = field(default=50, metadata={"help": "Suffix BLEU: prefix tokens fed to the model (ICU: 50)."})
    bleu_suffix: int = field(default=50, metadata={"help": "Suffix BLEU: tokens generated and compared (ICU: 50)."})
    min_k: float = field(default=0.2, metadata={"help": "Min-K% Prob attack: fraction of least likely tokens averaged."})
    secret_slack: int = field(default=8, metadata={"help": "Extraction: tokens generated beyond the secret's length."})
    # relearning probe
    relearn_steps: int = field(default=0, metadata={"help": "Relearning probe: optimizer steps (0 = no probe)."})
    relearn_fraction: float = field(default=0.5, metadata={"help": "Relearning probe: share of the forget set trained on; the rest is held out."})
    relearn_lr: float = field(default=1e-3, metadata={"help": "Relearning probe: learning rate of the throwaway LoRA."})
    relearn_r: int = field(default=8, metadata={"help": "Relearning probe: LoRA rank."})
    relearn_batch_size: int = field(default=4, metadata={"help": "Relearning probe: samples per step."})
    seed: int = field(default=0, metadata={"help": "Seed of the relearning split and LoRA init."})

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InputError(f"invalid evaluation setting: {msg}")

        need(self.el_n >= 1, "el_n must be >= 1")
        need(self.el_start >= 1, "el_start must be >= 1")
        need(self.max_length > self.el_n, "max_length must exceed el_n")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(self.ppl_window is None or self.ppl_window >= 2, "ppl window must be >= 2")
        need(self.ppl_stride is None or self.ppl_stride >= 1, "ppl stride must be >= 1")
        need(0 < self.min_k <= 1, "min_k must be in (0, 1]")
        need(self.relearn_steps >= 0, "relearn steps must be >= 0")
        need(0 < self.relearn_fraction < 1, "relearn fraction must be in (0, 1)")


def parse_metrics(spec: Optional[str | Sequence[str]]) -> List[str]:
    """'ma,el,ppl' -> ['ma', 'el', 'ppl']; unknown names are an InputError."""
    if spec is None:
        return list(DEFAULT_METRICS)
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise InputError(f"unknown metric(s): {', '.join(bad)} (choose from {', '.join(METRICS)})")
    if not names:
        raise InputError("no metrics given")
    return list(dict.fromkeys(names))


def _tokenize(tokenizer, texts: Sequence[str], max_length: Optional[int], min_tokens: int, name: str) -> List[torch.Tensor]:
    out = []
    for i, t in enumerate(texts):
        if max_length is not None:  # see data.MAX_CHARS_PER_TOKEN: never tokenize megabytes to keep 200 tokens
            t = t[:max_length * MAX_CHARS_PER_TOKEN]
        ids = tokenizer(t, add_special_tokens=True)["input_ids"]
        if max_length is not None:
            ids = ids[:max_length]
        if len(ids) < min_tokens:
            raise InputError(f"{name} sample #{i + 1} has {len(ids)} tokens; at least {min_tokens} are needed")
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


@torch.no_grad()
def evaluate(model, tokenizer, texts: Sequence[str], metrics: Sequence[str] = DEFAULT_METRICS,
             config: Optional[EvalConfig] = None, unseen: Optional[Sequence[str]] = None,
             secrets: Optional[Sequence[Tuple[str, str]]] = None, salt: Optional[str] = None,
             oracle=None) -> dict:
    """Score `model` on `texts` (and `unseen` / `secrets` where a metric needs them).

    Returns {"count", "metrics", <metric>: mean, ..., "samples": [per-sample values], "seconds"}.
    `ppl` is the corpus perplexity (every token weighs the same); each sample also gets its own.
    `mia` maps each attack to its ROC-AUC of `texts` (members) against `unseen` (non-members).
    With `salt` (e.g. an adapter's manifest salt), samples carry the same ids as that manifest.
    With `mia`, `privacy` holds the field's privacy metrics under open-unlearning's names
    (mia_loss, mia_zlib, mia_min_k, mia_min_k_plus_plus, forget_quality = KS p-value of the
    per-sample loss against `unseen`, extraction_strength); with an `oracle` model (one that never
    saw `texts`) also privleak per attack, in percent (MUSE).
    """
    config = config or EvalConfig()
    metrics = parse_metrics(metrics)
    if "mia" in metrics and not unseen:
        raise InputError("metric 'mia' needs unseen text (--unseen FILE): the non-members to tell apart")
    if "extraction" in metrics and not secrets:
        raise InputError("metric 'extraction' needs prefix/secret pairs (--secrets FILE)")
    text_metrics = [m for m in metrics if m != "extraction"]
    if text_metrics and not texts:
        raise InputError("no texts to evaluate")
    pad_id = tokenizer.pad_token_id
    model.eval()
    result: dict = {"count": len(texts), "metrics": metrics}
    seconds: Dict[str, float] = {}
    samples: List[dict] = [{"index": i} for i in range(len(texts))]
    if salt:
        for row, t in zip(samples, texts):
            row["id"] = sample_id(t, salt)

    min_tokens = config.el_n + 1 if "el" in metrics else 2
    seqs = _tokenize(tokenizer, texts, config.max_length, min_tokens, "data") if text_metrics else []
    for row, x in zip(samples, seqs):
        row["tokens"] = len(x)

    if "ma" in metrics or "el" in metrics:
        t0 = time.perf_counter()
        # score_samples always computes both; EL costs far more than MA, so skip it when not asked
        if "el" in metrics:
            s = score_samples(model, seqs, pad_id, config.el_n, config.el_start, config.batch_size)
            ma, el = s.ma, s.el
        else:
            from .metrics import teacher_forced

            ma = []
            for b in range(0, len(seqs), config.batch_size):
                ma.extend(teacher_forced(model, seqs[b:b + config.batch_size], pad_id).ma().tolist())
            el = None
        for key, vals in (("ma", ma), ("el", el)):
            if key in metrics and vals is not None:
                result[key] = _mean(vals)
                for row, v in zip(samples, vals):
                    row[key] = float(v)
        seconds["ma_el" if "el" in metrics else "ma"] = time.perf_counter() - t0

    if "ppl" in metrics:
        t0 = time.perf_counter()
        full = _tokenize(tokenizer, texts, None, 2, "data")
        p = perplexity(model, full, pad_id, config.ppl_window, config.ppl_stride, config.batch_size)
        result["ppl"] = p.corpus
        result["ppl_tokens"] = sum(p.token_counts)
        for row, v in zip(samples, p.per_sample):
            row["ppl"] = v
        seconds["ppl"] = time.perf_counter() - t0

    if "bleu" in metrics:
        t0 = time.perf_counter()
        vals = suffix_bleu(model, seqs, pad_id, config.bleu_prefix, config.bleu_suffix, config.batch_size)
        result["bleu"] = _mean(vals)
        for row, v in zip(samples, vals):
            row["bleu"] = v
        seconds["bleu"] = time.perf_counter() - t0

    if "mia" in metrics:
        from .mia import membership_inference, zlib_sizes_of

        t0 = time.perf_counter()
        useen = _tokenize(tokenizer, unseen, config.max_length, 2, "unseen")
        mia = membership_inference(model, seqs, useen, pad_id, zlib_sizes_of(tokenizer, seqs),
                                   zlib_sizes_of(tokenizer, useen), config.min_k, config.batch_size)
        result["mia"] = {a: {"auc": r["auc"], "tpr_at_5fpr": r["tpr_at_5fpr"]} for a, r in mia.items()}
        result["mia_scores"] = {a: {"members": r["members"], "non_members": r["non_members"]} for a, r in mia.items()}
        result["unseen_count"] = len(useen)
        for a, r in mia.items():
            for row, v in zip(samples, r["members"]):
                row[f"mia_{a}"] = v
        result["privacy"] = privacy_metrics(model, seqs, useen, pad_id, mia, oracle, tokenizer, config)
        seconds["mia"] = time.perf_counter() - t0

    if "extraction" in metrics:
        t0 = time.perf_counter()
        try:
            rows = secret_extraction(model, tokenizer, secrets, config.secret_slack, config.batch_size)
        except ValueError as e:
            raise InputError(f"secrets: {e}") from None
        result["extraction"] = _mean([r["extracted"] for r in rows])
        result["extraction_token_accuracy"] = _mean([r["token_accuracy"] for r in rows])
        result["secrets"] = [{"index": i, **r} for i, r in enumerate(rows)]
        seconds["extraction"] = time.perf_counter() - t0

    result["samples"] = samples if text_metrics else []
    result["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    return result


def privacy_metrics(model, seqs, unseen_seqs, pad_id: int, mia: dict, oracle=None, tokenizer=None,
                    config: Optional["EvalConfig"] = None) -> dict:
    """open-unlearning's privacy metrics from an MIA result (mia.membership_inference) and the model."""
    from .mia import extraction_strength, forget_quality, membership_inference, privleak, zlib_sizes_of

    config = config or EvalConfig()
    out = {f"mia_{a}": r["auc"] for a, r in mia.items()}
    out["forget_quality"] = forget_quality(mia["loss"]["members"], mia["loss"]["non_members"])
    strengths = []
    for s in range(0, len(seqs), config.batch_size):
        tf = teacher_forced(model, list(seqs[s:s + config.batch_size]), pad_id)
        for row, x in enumerate(seqs[s:s + config.batch_size]):
            n = len(x) - 1
            strengths.append(extraction_strength(tf.predictions[row, :n].tolist(), x[1:].tolist()))
    out["extraction_strength"] = _mean(strengths)
    if oracle is not None:
        om = membership_inference(oracle, seqs, unseen_seqs, pad_id, zlib_sizes_of(tokenizer, seqs),
                                  zlib_sizes_of(tokenizer, unseen_seqs), config.min_k, config.batch_size)
        out["oracle"] = {f"mia_{a}": r["auc"] for a, r in om.items()}
        out["privleak"] = {a: privleak(mia[a]["auc"], om[a]["auc"]) for a in mia if a in om and om[a]["auc"] > 0}
    return out


def forget_mia(model, tokenizer, forget_seqs: Sequence[torch.Tensor], unseen_texts: Sequence[str],
               max_length: int = 200, k: float = 0.2, batch_size: int = 16) -> dict:
    """Membership inference of a forget request: forget samples vs unseen text, without and with the adapter.

    For the report of `forget`: {"before": {attack: {...}}, "after": {...}}; "before" is the
    same model with its adapters switched off (the base). Scores are numbers only.
    """
    from .mia import membership_inference, zlib_sizes_of

    pad_id = tokenizer.pad_token_id
    unseen = _tokenize(tokenizer, unseen_texts, max_length, 2, "unseen")
    fz, uz = zlib_sizes_of(tokenizer, forget_seqs), zlib_sizes_of(tokenizer, unseen)
    was_training = model.training
    model.eval()
    out = {}
    if _has_adapters(model):
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        with model.disable_adapter():
            out["before"] = membership_inference(model, forget_seqs, unseen, pad_id, fz, uz, k, batch_size)
        for n, p in model.named_parameters():  # see relearn_probe
            p.requires_grad_(grads[n])
    out["after"] = membership_inference(model, forget_seqs, unseen, pad_id, fz, uz, k, batch_size)
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------ relearning probe

@contextlib.contextmanager
def temporary_lora(model, r: int = 8, seed: int = 0, name: str = "icu_relearn"):
    """A fresh trainable LoRA on top of `model` (and of every adapter it already stacks).

    Yields the model to train; on exit the LoRA is removed and every parameter's requires_grad is
    put back, so the model is exactly as before.
    """
    from peft import LoraConfig, get_peft_model

    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", bias="none",
                     task_type="CAUSAL_LM")
    if hasattr(model, "peft_config"):
        previous = list(model.active_adapters)
        model.add_adapter(name, cfg)
        # the tuner accepts a list: the stack stays active and the new LoRA adds to it
        model.base_model.set_adapter(previous + [name])
        for n, p in model.named_parameters():
            p.requires_grad_(f".{name}." in n)
        try:
            yield model
        finally:
            model.base_model.set_adapter(previous)
            model.delete_adapter(name)
            model.base_model.set_adapter(previous)
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, False))
            model.eval()
    else:
        peft_model = get_peft_model(model, cfg, adapter_name=name)
        try:
            yield peft_model
        finally:
            peft_model.unload()
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, False))
            model.eval()


def _nll_step(model, seqs: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    from .losses import chunked_token_nll

    device = model_device(model)
    ids, mask = (t.to(device) for t in pad_batch(seqs, pad_id))
    parts = backbone_and_head(model)
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        from .losses import token_nll

        return token_nll(logits, ids, mask)
    backbone, head = parts
    h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    s, c = chunked_token_nll(h, head, ids, mask)
    return s / c.clamp(min=1)


def _has_adapters(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def relearn_probe(model, tokenizer, forget_texts: Sequence[str], control_texts: Optional[Sequence[str]] = None,
                  config: Optional[EvalConfig] = None) -> dict:
    """Fine-tune a throwaway LoRA for `relearn_steps` steps on part of the forget set; measure the rest.

    Unlearning that only hides knowledge lets a few steps on some forgotten samples bring back the
    others too; unlearning that removed it does not (more than the same steps lift unseen text of
    the same kind, the control). Reports MA / EL_n of the held-out forget samples and the control
    before and after, the held-out gain beyond the control's gain, and, when the model carries
    adapters, `recovery`: the share of the gap between the adapter-free level and the forgotten
    level that came back (0 = nothing, 1 = all of it). The model is left exactly as it was.
    """
    config = config or EvalConfig()
    steps = config.relearn_steps
    if len(forget_texts) < 2:
        raise InputError("the relearning probe needs at least 2 forget samples (some to train on, some held out)")
    pad_id = tokenizer.pad_token_id
    seqs = _tokenize(tokenizer, forget_texts, config.max_length, config.el_n + 1, "forget")
    control = _tokenize(tokenizer, control_texts, config.max_length, config.el_n + 1, "control") if control_texts else []
    g = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(len(seqs), generator=g).tolist()
    n_train = min(len(seqs) - 1, max(1, round(config.relearn_fraction * len(seqs))))
    train = [seqs[i] for i in perm[:n_train]]
    held = [seqs[i] for i in perm[n_train:]]

    def score(seq_list):
        s = score_samples(model, seq_list, pad_id, config.el_n, config.el_start, config.batch_size)
        return s.mean()

    t0 = time.perf_counter()
    model.eval()
    out: dict = {"steps": steps, "learning_rate": config.relearn_lr, "lora_r": config.relearn_r,
                 "train_count": len(train), "held_out_count": len(held), "control_count": len(control),
                 "held_out": {"before": score(held)}, "control": {"before": score(control)} if control else None}
    if _has_adapters(model):
        grads = {n: p.requires_grad for n, p in model.named_parameters()}
        with model.disable_adapter():
            out["held_out"]["original"] = score(held)
        # leaving disable_adapter() re-activates the adapters, which marks them trainable again
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
    with temporary_lora(model, config.relearn_r, config.seed) as m:
        trainable = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=config.relearn_lr)
        order = torch.Generator().manual_seed(config.seed + 1)
        m.train()
        losses = []
        for _ in range(steps):
            idx = torch.randperm(len(train), generator=order)[: config.relearn_batch_size].tolist()
            loss = _nll_step(m, [train[i] for i in idx], pad_id)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        m.eval()
        out["train_loss"] = {"first": losses[0], "last": losses[-1]} if losses else None
        out["held_out"]["after"] = score(held)
        if control:
            out["control"]["after"] = score(control)
    h = out["held_out"]
    gain = {k: h["after"][k] - h["before"][k] for k in ("ma", "el")}
    if control:
        c = out["control"]
        out["gain_over_control"] = {k: gain[k] - (c["after"][k] - c["before"][k]) for k in ("ma", "el")}
    if "original" in h:
        out["recovery"] = {}
        for k in ("ma", "el"):
            gap = h["original"][k] - h["before"][k]
            # a gap this small means nothing measurable was forgotten: a ratio would be noise
            out["recovery"][k] = gain[k] / gap if gap > 1e-3 else None
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


# ------------------------------------------------------------------------------ lm-eval harness

def run_lm_eval(model, tokenizer, tasks: Sequence[str], include_path: Optional[str] = None,
                limit: Optional[float] = None, num_fewshot: Optional[int] = None, batch_size: int = 1) -> dict:
    """EleutherAI lm-eval tasks on this very model object (adapters included); numeric results only.

    Per-sample logging is off, so no task text ends up in the result.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise InputError("lm-eval tasks need the lm-eval harness: pip install 'icu-peft[eval]'") from None
    if not logger.isEnabledFor(logging.DEBUG):  # lm-eval logs every request batch at INFO
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = None
    if include_path:
        # indexing lm-eval's ~15k bundled task files takes half a minute: skip it when the local
        # directory has every task asked for
        local = TaskManager(include_path=include_path, include_defaults=False)
        tm = local if all(t in local.all_tasks for t in tasks) else None
    tm = tm or TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s): {', '.join(unknown)}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    res = simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    out = {}
    for task, metrics in (res or {}).get("results", {}).items():
        out[task] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return out


def config_dict(config: EvalConfig) -> dict:
    return asdict(config)


__all__ = ["METRICS", "DEFAULT_METRICS", "EvalConfig", "parse_metrics", "evaluate", "relearn_probe",
           "temporary_lora", "run_lm_eval", "forget_mia"]
