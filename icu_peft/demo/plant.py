"""Planting: full fine-tuning of SmolLM2-135M on the demo records until greedy decoding leaks them.

The planted model is cached as a plain transformers directory (safetensors + tokenizer) under the
user's cache directory, keyed by a hash of the planted texts and the training settings, and written
atomically: an interrupted run leaves nothing behind, the next run skips planting.

`plant_records` takes any list of texts, so the benchmark's oracle (a model planted without the
forget set) is `plant_records(corpus.retain_texts, ...)`, or `plant_oracle(corpus)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..adapters import atomic_output_dir
from ..data import pad_batch
from ..errors import InputError, OutputExistsError
from ..metrics import greedy_continue
from ..models import cache_root  # noqa: F401  (also re-exported: the demo and tests import it from here)
from .records import DemoCorpus, Probe
from .smollm2 import find_smollm2, load_smollm2

logger = logging.getLogger("icu_peft")

PLANT_INFO = "plant_info.json"
PLANT_FORMAT = "icu-peft/planted/v1"


@dataclass
class PlantSettings:
    """How the records are fine-tuned into the model (full fine-tuning, fp32, CPU)."""

    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (constant after warmup)."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warmup steps."})
    batch_size: int = field(default=4, metadata={"help": "Records per optimisation step (small: more updates per epoch memorise sooner)."})
    max_epochs: int = field(default=40, metadata={"help": "Epoch cap."})
    min_epochs: int = field(default=4, metadata={"help": "Check for memorisation only after this many epochs."})
    check_every: int = field(default=2, metadata={"help": "Epochs between memorisation checks."})
    extra_epochs: int = field(default=2, metadata={"help": "Epochs trained after every secret leaks, so memorisation survives 4-bit quantisation."})
    freeze_embeddings: bool = field(default=True, metadata={"help": "Keep the (tied) embeddings frozen: 20% fewer trainable weights, faster."})
    train_top_layers: int = field(default=0, metadata={"help": "Train only the last N decoder layers (0: all): backward stops there, ~2x faster steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order."})


# ------------------------------------------------------------------------------ cache

def plant_key(texts: Sequence[str], settings: PlantSettings, base_id: str) -> str:
    """Hash of everything that determines the planted weights."""
    h = hashlib.sha256()
    fields = asdict(settings)
    if not fields["train_top_layers"]:  # its default: keys of models planted before the field existed stay valid
        del fields["train_top_layers"]
    h.update(json.dumps({"format": PLANT_FORMAT, "base": base_id, "settings": fields}, sort_keys=True).encode())
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()[:16]


def _base_id() -> str:
    folder, gguf = find_smollm2()
    return f"{gguf}:{(folder / gguf).stat().st_size}"


def planted_dir(texts: Sequence[str], settings: Optional[PlantSettings] = None, root: Optional[Path] = None) -> Path:
    settings = settings or PlantSettings()
    return Path(root or cache_root()) / f"planted-{plant_key(texts, settings, _base_id())}"


def read_plant_info(directory: Path) -> Optional[dict]:
    p = Path(directory) / PLANT_INFO
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


# ------------------------------------------------------------------------------ extraction

@torch.no_grad()
def extract_secrets(model, tokenizer, probes: Sequence[Probe], batch_size: int = 32,
                    extra_tokens: int = 3) -> List[bool]:
    """For each probe: does greedy decoding of its prefix reproduce the secret (exact string)?"""
    if not probes:
        return []
    contexts = [torch.tensor(tokenizer(p.prefix)["input_ids"], dtype=torch.long) for p in probes]
    num_new = [len(tokenizer(" " + p.secret)["input_ids"]) + extra_tokens for p in probes]
    was_training = model.training
    model.eval()
    outs = greedy_continue(model, contexts, num_new, tokenizer.pad_token_id, batch_size=batch_size)
    if was_training:
        model.train()
    return [tokenizer.decode(o, skip_special_tokens=True).strip().startswith(p.secret) for o, p in zip(outs, probes)]


# ------------------------------------------------------------------------------ training

def _train(model, tokenizer, texts: Sequence[str], probes: Sequence[Probe], settings: PlantSettings,
           progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    seqs = [torch.tensor(tokenizer(t)["input_ids"], dtype=torch.long) for t in texts]
    pad = tokenizer.pad_token_id
    if settings.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if settings.train_top_layers:
        # Memorising a few records needs no change to the lower layers, and freezing them lets the
        # backward pass stop early: the demo's first run has a 10-minute budget on two cores.
        layers = model.model.layers
        for layer in layers[:max(0, len(layers) - settings.train_top_layers)]:
            layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    # After every secret leaks, train `extra_epochs` more at a lower rate, then require a clean check
    # again: at the full rate a few secrets flicker in and out between epochs.
    scale = [1.0]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: scale[0] * min(1.0, (s + 1) / max(1, settings.warmup_steps)))
    gen = torch.Generator().manual_seed(settings.seed)
    history, leaked_at, hits, done = [], None, None, False
    epoch = 0
    model.train()
    # no ETA: planting stops once every secret comes out (the quick demo's 12 people at epoch 17 of 40), so
    # one counted to max_epochs overstated the wait 2-3x
    bar = tqdm(total=settings.max_epochs, desc="planting", disable=not progress, leave=False, dynamic_ncols=True,
               bar_format="{desc}: epoch {n}, at most {total} (stops once every secret comes out) "
                          "[{elapsed}, {rate_fmt}{postfix}]")
    for epoch in range(1, settings.max_epochs + 1):
        order = torch.randperm(len(seqs), generator=gen).tolist()
        total = 0.0
        nsteps = 0
        for s in range(0, len(order), settings.batch_size):
            ids, mask = pad_batch([seqs[i] for i in order[s:s + settings.batch_size]], pad)
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach())
            nsteps += 1
        row = {"epoch": epoch, "loss": round(total / nsteps, 4)}
        if leaked_at is None:
            check = epoch >= settings.min_epochs and (epoch - settings.min_epochs) % settings.check_every == 0
        else:
            check = epoch - leaked_at >= settings.extra_epochs
        hits = None
        if check:
            hits = extract_secrets(model, tokenizer, probes)
            row["secrets"] = f"{sum(hits)}/{len(hits)}"
            if all(hits):
                if leaked_at is None:
                    leaked_at = epoch
                    scale[0] = 0.3
                done = epoch - leaked_at >= settings.extra_epochs
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=row["loss"], secrets=row.get("secrets", ""))
        logger.info("planting epoch %d: loss %.4f%s", epoch, row["loss"],
                    f", secrets leaked {row['secrets']}" if "secrets" in row else "")
        if done:
            break
    bar.close()
    model.eval()
    if hits is None:
        hits = extract_secrets(model, tokenizer, probes)
    for p in model.parameters():
        p.requires_grad_(False)
    return {"epochs": epoch, "memorised_at_epoch": leaked_at, "secrets_leaked": sum(hits),
            "secrets_total": len(hits), "history": history}


def plant_records(texts: Sequence[str], probes: Sequence[Probe], settings: Optional[PlantSettings] = None,
                  root: Optional[Path] = None, progress: bool = True, force: bool = False) -> Path:
    """Fine-tune SmolLM2-135M on `texts` until every probe's secret leaks; return the cached directory.

    Skips the work when the directory for these texts and settings already exists (unless `force`).
    """
    if not texts:
        raise InputError("nothing to plant: the list of texts is empty")
    settings = settings or PlantSettings()
    out = planted_dir(texts, settings, root)
    if read_plant_info(out) is not None and not force:
        logger.info("using the cached planted model %s", out)
        return out
    t0 = time.time()
    torch.manual_seed(settings.seed)
    model, tok = load_smollm2(torch.float32)
    result = _train(model, tok, texts, probes, settings, progress=progress)
    if result["secrets_leaked"] < result["secrets_total"]:
        logger.warning("planting reached the epoch cap (%d) with %d of %d secrets leaking", settings.max_epochs,
                       result["secrets_leaked"], result["secrets_total"])
    info = {"format": PLANT_FORMAT, "base": _base_id(), "settings": asdict(settings), "num_texts": len(texts),
            "wall_time_s": round(time.time() - t0, 1), **result}
    try:
        with atomic_output_dir(out, overwrite=force) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / PLANT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    except OutputExistsError:
        if read_plant_info(out) is None:  # not another run's finished copy: a stray directory
            raise
        logger.info("another run planted %s first; using it", out)
    logger.info("planted %d records in %.0f s (%d epochs) -> %s", len(texts), info["wall_time_s"], result["epochs"], out)
    return out


def plant_corpus(corpus: DemoCorpus, settings: Optional[PlantSettings] = None, **kw) -> Path:
    """The demo's planted model: every person of the corpus memorised."""
    return plant_records(corpus.texts, corpus.probes(corpus.people), settings, **kw)


def plant_oracle(corpus: DemoCorpus, settings: Optional[PlantSettings] = None, **kw) -> Path:
    """What perfect unlearning would give: the same planting without the people who asked to be forgotten."""
    return plant_records(corpus.retain_texts, corpus.probes(corpus.kept_people), settings, **kw)


def _main(argv: Optional[List[str]] = None) -> int:
    """`python -m icu_peft.demo.plant SPEC_JSON`: plant a corpus in this process (the demo's child)."""
    import sys

    from ..cli import setup_logging
    from ..errors import ICUError
    from .records import make_corpus

    spec = json.loads((argv or sys.argv[1:])[0])
    setup_logging()
    try:
        plant_corpus(make_corpus(**spec["corpus"]), PlantSettings(**spec["settings"]),
                     root=Path(spec["root"]) if spec.get("root") else None, progress=spec.get("progress", True))
    except ICUError as e:
        print(f"icu-peft demo: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
