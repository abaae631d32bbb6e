"""The ICU loop: one forget request in, one LoRA forget adapter (and its manifest) out.

Read top to bottom: load -> tokenize -> thresholds -> neighbours -> attach LoRA -> score ->
[epoch: steps on the active samples -> re-score -> update the active set] -> save.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import resource
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from . import __version__
from .adapters import MANIFEST_FORMAT, atomic_output_dir, check_output_dir, utc_now, write_manifest
from .caches import CachedReference, FrozenPrefixBackbone
from .config import DEFAULT_EL_THRESHOLD, DEFAULT_MA_THRESHOLD, ICUConfig
from .data import (TokenizedSet, embed_with_model, embed_with_sentence_transformers, nearest_neighbours,
                   new_salt, pad_batch, sample_id, tokenize_texts)
from .errors import ICUError, InputError
from .losses import (chunked_kl_to_reference, chunked_sequence_logprob, chunked_token_nll, distinct_token_mask, icu_loss,
                     ngram_set, npo_loss)
from .metrics import Scores, backbone_and_head, model_device, score_samples, teacher_forced
from .models import attach_lora, base_fingerprint, load_base_model, load_tokenizer, lora_config
from .refine import Thresholds, calibrate_nll, forgotten_mask, is_forgotten
from .evaluation import forget_mia
from .report import write_report

logger = logging.getLogger("icu_peft")


@dataclass
class ForgetResult:
    """What a forget request returns: the trained PeftModel, its report (= manifest) and where it went."""

    model: object
    tokenizer: object
    report: dict
    output_dir: Optional[Path] = None


@dataclass
class _State:
    scores: Scores
    active: List[bool]
    epochs_active: List[int] = field(default_factory=list)


def _bar(total, desc, enabled, **kw):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, **kw)


def peak_memory_mb() -> dict:
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def library_versions() -> dict:
    import accelerate
    import peft
    import transformers

    out = {"icu_peft": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # bitsandbytes is optional when --no-quantize
        pass
    return out


# ------------------------------------------------------------------------------------ pieces

def measure_thresholds(model, tokenizer, unseen: Optional[Sequence[str]], config: ICUConfig, salt: str,
                       progress: bool = False) -> Thresholds:
    """Thresholds from (in order): explicit config values, unseen text scored by the base model, defaults.

    Explicit values skip scoring the unseen text (EL_n on text the model never saw is the costliest
    measurement there is); the unseen text still serves the membership-inference report.
    """
    if config.nll_target == "unseen" and not unseen:
        raise InputError("nll_target='unseen' needs unseen text (--unseen); give a number or 'off' instead")
    t, unseen_nll = _thresholds(model, tokenizer, unseen, config, salt, progress)
    if config.nll_target == "unseen" and unseen_nll is not None:
        t.nll = unseen_nll  # the unseen text was just scored: its NLL came with MA and EL
    elif config.nll_target == "unseen":
        tset = tokenize_texts(unseen, tokenizer, config.max_length, salt, min_tokens=2, name="unseen")
        nlls = []
        for s in range(0, len(tset), config.score_batch_size):
            nlls += teacher_forced(model, tset.input_ids[s:s + config.score_batch_size], tokenizer.pad_token_id).nll().tolist()
        t.nll = float(sum(nlls) / len(nlls))
    elif config.nll_target != "off":
        t.nll = float(config.nll_target)
    return t


def _thresholds(model, tokenizer, unseen, config: ICUConfig, salt: str, progress: bool) -> tuple:
    """(thresholds, the unseen text's mean NLL if it was scored here, else None)."""
    explicit = config.ma_threshold is not None and config.el_threshold is not None
    from_config = (Thresholds(ma=config.ma_threshold, el=config.el_threshold, bleu=config.bleu_threshold,
                              source="config") if explicit else None)
    if explicit and config.criterion == "ma_el":
        return from_config, None
    if unseen:
        tset = tokenize_texts(unseen, tokenizer, config.max_length, salt, min_tokens=config.el_n + 1, name="unseen")
        with _bar(len(tset), "scoring unseen", progress) as bar:
            s = score_samples(model, tset.input_ids, tokenizer.pad_token_id, config.el_n, config.el_start,
                              config.score_batch_size, with_bleu=config.criterion == "bleu",
                              bleu_prefix=config.bleu_prefix_tokens, bleu_suffix=config.bleu_suffix_tokens,
                              progress=bar)
        m = s.mean()
        ma = config.ma_threshold if config.ma_threshold is not None else m["ma"]
        el = config.el_threshold if config.el_threshold is not None else m["el"]
        return Thresholds(ma=ma, el=el, bleu=config.bleu_threshold, source="unseen", unseen_count=len(tset)), m["nll"]
    if explicit:
        return from_config, None
    if config.criterion == "ma_el":
        logger.warning("no --unseen file and no explicit thresholds: using Jang et al.'s GPT-Neo-125M values "
                       "(MA %.4f, EL %.4f), which may not fit this model", DEFAULT_MA_THRESHOLD, DEFAULT_EL_THRESHOLD)
    return Thresholds(
        ma=config.ma_threshold if config.ma_threshold is not None else DEFAULT_MA_THRESHOLD,
        el=config.el_threshold if config.el_threshold is not None else DEFAULT_EL_THRESHOLD,
        bleu=config.bleu_threshold, source="default"), None


@torch.no_grad()
def generate_retain_pool(model, tokenizer, config: ICUConfig, salt: str) -> TokenizedSet:
    """Texts sampled from the base model itself: a retain pool that needs no data.

    KL and NLL on the model's own samples hold its general behaviour in place, which is what the
    neighbours are for; they are not similar to the forget set, so selectivity is weaker than with
    a real retain pool of the same kind.
    """
    device = model_device(model)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    torch.manual_seed(config.seed)
    ids = torch.full((config.generated_retain_size, 1), start, dtype=torch.long, device=device)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_p=0.95,
                         max_new_tokens=min(config.max_length - 1, 64), pad_token_id=tokenizer.pad_token_id)
    del gen
    rows, hashes = [], []
    for row in out.cpu():
        keep = row[row != tokenizer.pad_token_id] if tokenizer.pad_token_id != start else row
        if len(keep) >= 2:
            rows.append(keep)
            hashes.append(sample_id(tokenizer.decode(keep), salt))
    return TokenizedSet(input_ids=rows, ids=hashes)


def find_neighbours(model, tokenizer, forget_set: TokenizedSet, retain_set: TokenizedSet, config: ICUConfig,
                    forget_texts: Optional[Sequence[str]], retain_texts: Optional[Sequence[str]]) -> torch.Tensor:
    """(num_forget, k) indices into the retain pool: each forget sample's nearest neighbours."""
    if config.num_neighbours == 0 or len(retain_set) == 0:
        return torch.empty((len(forget_set), 0), dtype=torch.long)
    if config.embedder == "base" or retain_texts is None:
        q = embed_with_model(model, forget_set, tokenizer.pad_token_id, tail_tokens=config.embed_tail_tokens)
        p = embed_with_model(model, retain_set, tokenizer.pad_token_id, tail_tokens=config.embed_tail_tokens)
    else:
        # ICU embeds the tail of each text; approximate a token tail by 5 characters per token.
        tail = config.embed_tail_tokens * 5
        q = embed_with_sentence_transformers(forget_texts, config.embedder, tail)
        p = embed_with_sentence_transformers(retain_texts, config.embedder, tail)
    return nearest_neighbours(q, p, config.num_neighbours)


def _score(model, tset: TokenizedSet, pad_id: int, config: ICUConfig, desc: str,
           el_max_ma: Optional[float] = None) -> Scores:
    model.eval()
    with _bar(len(tset), desc, config.progress) as bar:
        return score_samples(model, tset.input_ids, pad_id, config.el_n, config.el_start, config.score_batch_size,
                             with_bleu=config.criterion == "bleu", bleu_prefix=config.bleu_prefix_tokens,
                             bleu_suffix=config.bleu_suffix_tokens, progress=bar, el_max_ma=el_max_ma)


def _fmt_el(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def _parts(model):
    """(backbone, head): hidden states then logits; whole logits for models that post-process them."""
    parts = backbone_and_head(model)
    if parts is None:
        return (lambda **kw: _LogitsAsHidden(model(**kw).logits)), (lambda x: x)
    return parts


def adapter_disabled_reference(model):
    """The default reference: the same model with its adapters switched off (the frozen base)."""
    backbone, _ = _parts(model)

    def reference(input_ids, attention_mask):
        with model.disable_adapter():
            return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    return reference


def icu_step_loss(model, forget_seqs: Sequence[torch.Tensor], neighbour_seqs: Sequence[torch.Tensor], pad_id: int,
                  config: ICUConfig, reference=None, forget_weights: Optional[Sequence[torch.Tensor]] = None,
                  backbone=None) -> dict:
    """The unlearning objective on one batch; returns the total (with grad) and each term (floats).

    `reference(input_ids, attention_mask)` gives the reference model's final hidden states (no grad);
    by default the same model with its adapters switched off.
    `backbone` replaces the model's own (e.g. a caches.FrozenPrefixBackbone; same hidden states).
    """
    device = model_device(model)
    own, head = _parts(model)
    backbone = backbone or own
    if reference is None:
        reference = adapter_disabled_reference(model)
    ids, mask = (t.to(device) for t in pad_batch(forget_seqs, pad_id))
    h = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    if config.forget_loss == "npo":
        logp = chunked_sequence_logprob(h, head, ids, mask, config.loss_chunk_size)
        with torch.no_grad():
            ref_logp = chunked_sequence_logprob(reference(ids, mask), head, ids, mask, config.loss_chunk_size)
        # npo_loss is minimised; expressed as "-u * l_fgt" so the weights read the same for every method
        l_fgt = -npo_loss(logp, ref_logp, config.npo_beta)
    else:
        w = pad_batch(forget_weights, 0)[0].to(device=device, dtype=torch.float32) if forget_weights else None
        s, c = chunked_token_nll(h, head, ids, mask, config.loss_chunk_size,
                                 only_predicted=config.forget_tokens == "predicted", weights=w)
        l_fgt = s / c.clamp(min=1)
    zero = l_fgt.new_zeros(())
    l_lrn, l_kl = zero, zero
    if len(neighbour_seqs) and (config.learn_weight or config.kl_weight):
        s_lrn, s_kl = _neighbour_sums(model, neighbour_seqs, pad_id, config, reference, backbone)
        count = _target_count(neighbour_seqs)
        l_lrn, l_kl = s_lrn / count, s_kl / count
    loss = icu_loss(l_fgt, l_lrn, l_kl, config.forget_weight, config.learn_weight, config.kl_weight)
    return {"loss": loss, "l_fgt": float(l_fgt.detach()), "l_lrn": float(l_lrn.detach()), "l_kl": float(l_kl.detach())}


def _target_count(seqs: Sequence[torch.Tensor]) -> int:
    """Next-token targets of right-padded sequences: what the neighbour terms average over."""
    return max(sum(max(len(x) - 1, 0) for x in seqs), 1)


def _neighbour_sums(model, seqs: Sequence[torch.Tensor], pad_id: int, config: ICUConfig, reference,
                    backbone=None) -> tuple:
    """(sum of NLL, sum of KL to the reference) over the neighbours' targets, with grad."""
    device = model_device(model)
    own, head = _parts(model)
    backbone = backbone or own
    nids, nmask = (t.to(device) for t in pad_batch(seqs, pad_id))
    nh = backbone(input_ids=nids, attention_mask=nmask).last_hidden_state
    s_lrn = s_kl = nh.new_zeros((), dtype=torch.float32)
    if config.learn_weight:
        s_lrn = chunked_token_nll(nh, head, nids, nmask, config.loss_chunk_size)[0]
    if config.kl_weight:
        with torch.no_grad():
            ref_h = reference(nids, nmask)
        s_kl = chunked_kl_to_reference(nh, ref_h, head, nmask, config.loss_chunk_size)[0]
    return s_lrn, s_kl


def icu_step_backward(model, forget_seqs: Sequence[torch.Tensor], neighbour_seqs: Sequence[torch.Tensor], pad_id: int,
                      config: ICUConfig, reference=None, forget_weights: Optional[Sequence[torch.Tensor]] = None,
                      scale: float = 1.0, backbone=None) -> dict:
    """Backpropagate `scale` x icu_step_loss(...); returns its terms as floats ("loss" NaN if non-finite).

    With config.neighbour_micro_batch, the forget term and each slice of the neighbours get their own
    forward/backward pass. The objective is a sum over tokens, so the accumulated gradient is the
    same; the activations held at once are a slice's instead of the whole batch's. A non-finite piece
    is not backpropagated: the caller discards the step.
    """
    if reference is None:
        reference = adapter_disabled_reference(model)
    micro = config.neighbour_micro_batch
    if not micro or len(neighbour_seqs) <= micro or not (config.learn_weight or config.kl_weight):
        out = icu_step_loss(model, forget_seqs, neighbour_seqs, pad_id, config, reference, forget_weights, backbone)
        if not torch.isfinite(out["loss"]):
            return {**out, "loss": float("nan")}
        (out["loss"] * scale).backward()
        return {**out, "loss": float(out["loss"].detach())}
    first = icu_step_loss(model, forget_seqs, [], pad_id, config, reference, forget_weights, backbone)
    if not torch.isfinite(first["loss"]):
        return {**first, "loss": float("nan")}
    (first["loss"] * scale).backward()
    count = _target_count(neighbour_seqs)
    lrn = kl = 0.0
    for i in range(0, len(neighbour_seqs), micro):
        s_lrn, s_kl = _neighbour_sums(model, neighbour_seqs[i:i + micro], pad_id, config, reference, backbone)
        piece = (config.learn_weight * s_lrn + config.kl_weight * s_kl) / count
        if not torch.isfinite(piece):
            return {**first, "loss": float("nan")}
        (piece * scale).backward()
        lrn += float(s_lrn.detach()) / count
        kl += float(s_kl.detach()) / count
    loss = float(first["loss"].detach()) + config.learn_weight * lrn + config.kl_weight * kl
    return {"loss": loss, "l_fgt": first["l_fgt"], "l_lrn": lrn, "l_kl": kl}


def _active(scores: Scores, thresholds: Thresholds, config: ICUConfig) -> List[bool]:
    """Which samples the next epoch trains on.

    IUR: those not yet forgotten. Without IUR (Jang et al.): all of them until the set's mean MA and
    EL pass the thresholds, then none.
    """
    done = forgotten_mask(scores, thresholds, config.criterion)
    if config.iur:
        return [not f for f in done]
    m = scores.mean()  # Jang's rule is the per-sample test applied to the set's means
    passed = is_forgotten(m["ma"], m["el"], thresholds, m.get("bleu"), config.criterion)
    return [not passed] * len(done)


def prepare_trainable(base_model, config: ICUConfig):
    """(model to train, reference) for a config.

    - A plain base: attach a fresh LoRA adapter; the reference is the same model, adapter disabled.
    - A PeftModel that already holds forget adapters (sequential stacking): add a new adapter named
      'default' trained with the others active and frozen; the reference is the existing stack.
    - use_lora=False (baseline): every weight trains; the reference is a frozen copy of the base.
    """
    if not config.use_lora:
        ref_model = copy.deepcopy(base_model).eval()
        for p in base_model.parameters():
            p.requires_grad_(True)
        ref_backbone, _ = _parts(ref_model)

        def reference(input_ids, attention_mask):
            return ref_backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        return base_model, reference
    if hasattr(base_model, "peft_config"):
        return _add_stacked_adapter(base_model, config)
    model = attach_lora(base_model, config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules,
                        config.gradient_checkpointing, last_layers=config.lora_layers)
    return model, None


def _add_stacked_adapter(model, config: ICUConfig):
    old = list(model.peft_config)
    if "default" in old:
        raise InputError("the existing stack already has an adapter named 'default'")
    model.add_adapter("default", lora_config(model.get_base_model(), config.lora_r, config.lora_alpha,
                                             config.lora_dropout, config.target_modules, config.lora_layers))
    backbone, _ = _parts(model)

    def activate(names):
        model.base_model.set_adapter(names)
        # set_adapter marks active adapters trainable: only the new one may train
        for n, p in model.named_parameters():
            p.requires_grad_(".default." in n)

    activate(old + ["default"])

    def reference(input_ids, attention_mask):
        activate(old)
        try:
            return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        finally:
            activate(old + ["default"])

    return model, reference


def _distinct_masks(forget_set: TokenizedSet, retain_set: TokenizedSet, n: int) -> Optional[List[torch.Tensor]]:
    """Per forget sample, which targets the forget term pushes on (forget_distinct_ngram); None when off."""
    if not n or not len(retain_set):
        return None
    shared = ngram_set(retain_set.input_ids, n)
    masks = []
    for x in forget_set.input_ids:
        m = distinct_token_mask(x, shared, n)
        if m.sum() == 0:  # nothing private to push on: fall back to every token rather than never forget
            logger.warning("a forget sample shares every %d-gram with the retain pool: its forget term uses all tokens", n)
            m = torch.ones(len(x))
            m[0] = 0.0
        masks.append(m)
    share = sum(float(m.sum()) for m in masks) / max(1, sum(len(x) - 1 for x in forget_set.input_ids))
    logger.info("forget term on distinct tokens only: %.0f%% of the forget set's targets (n-gram %d)", 100 * share, n)
    return masks


def _stacked_on(base_model) -> Optional[list]:
    """Sequential training: the requests active (and frozen) while this adapter trained, by weights hash."""
    from .adapters import adapter_weights_sha256, leaf_manifests

    stack = getattr(base_model, "icu_adapters", None)
    if not stack:
        return None
    return [{"request_id": leaf.get("request_id"), "adapter_sha256": adapter_weights_sha256(leaf)}
            for _, d, m in stack for _, leaf in leaf_manifests(d, m)]


class _LogitsAsHidden:
    def __init__(self, logits):
        self.last_hidden_state = logits


def _lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, state: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n])


# ------------------------------------------------------------------------------------ the request

def forget(config: ICUConfig, forget_texts: Sequence[str], retain_texts: Optional[Sequence[str]] = None,
           unseen_texts: Optional[Sequence[str]] = None, output_dir: Optional[str | Path] = None,
           overwrite: bool = False, base_model=None, tokenizer=None) -> ForgetResult:
    """Run one ICU forget request and return the trained PeftModel with its report.

    `base_model`/`tokenizer` may be passed to reuse a loaded (frozen) base; otherwise they are
    loaded from `config.model`. With `output_dir`, the adapter and its manifest are written there
    atomically (main process only under DDP).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t0 = time.time()
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    if not forget_texts:
        raise InputError("the forget set is empty")
    # cpu=True on a machine without CUDA: it is what makes accelerate set up gloo under torchrun
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    show = config.progress and main
    set_seed(config.seed)
    salt = config.hash_salt or new_salt()
    request_id = config.request_id or str(uuid.uuid4())

    # 1. base model and data
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model, config.gguf_file, config.trust_remote_code)
    if base_model is None:
        base_model = load_base_model(config.model, config.quantize, config.compute_dtype, config.gguf_file,
                                     config.trust_remote_code, device=accelerator.device)
    pad_id = tokenizer.pad_token_id
    forget_set = tokenize_texts(forget_texts, tokenizer, config.max_length, salt, min_tokens=config.el_n + 1)
    if retain_texts:
        retain_set = tokenize_texts(retain_texts, tokenizer, config.max_length, salt, min_tokens=2, name="retain")
        retain_source = "file"
    elif config.no_retain == "refuse":
        raise InputError("no retain pool given (--retain) and no_retain='refuse'")
    else:
        logger.warning("no retain pool given: sampling %d neighbour texts from the base model itself "
                       "(weaker selectivity than real text of the same kind; pass --retain)",
                       config.generated_retain_size)
        retain_set = generate_retain_pool(base_model, tokenizer, config, salt)
        retain_source = "generated"
    fingerprint = base_fingerprint(base_model)

    # 2. thresholds and neighbours, both measured on the untouched base
    thresholds = measure_thresholds(base_model, tokenizer, unseen_texts, config, salt, progress=show)
    neighbours = find_neighbours(base_model, tokenizer, forget_set, retain_set, config, forget_texts,
                                 retain_texts if retain_source == "file" else None)
    logger.info("forget set: %d samples (%d truncated); retain pool: %d (%s); thresholds MA<=%.4f EL%d<=%.4f (%s)",
                len(forget_set), forget_set.truncated, len(retain_set), retain_source, thresholds.ma, config.el_n,
                thresholds.el, thresholds.source)
    if thresholds.nll is not None:
        logger.info("NLL target: after training, the adapter is scaled so the forget set's mean NLL is %.3f +- %.2f",
                    thresholds.nll, config.nll_tolerance)

    distinct = _distinct_masks(forget_set, retain_set, config.forget_distinct_ngram)

    # 3. the forget adapter (or, for the full fine-tuning baseline, every weight)
    model, reference = prepare_trainable(base_model, config)
    reference = CachedReference(reference or adapter_disabled_reference(model), config.reference_cache_mb * 2**20)
    # with LoRA in the top layers only, the layers below are run once per sample instead of every step
    train_backbone = (FrozenPrefixBackbone.build(_parts(model)[0], config.prefix_cache_mb * 2**20)
                      if backbone_and_head(model) else None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, betas=tuple(config.adam_betas),
                                  weight_decay=config.weight_decay)

    retain_eval = TokenizedSet(retain_set.input_ids[:32], retain_set.ids[:32])
    # MA < 0 never happens: with retain_el off the retain set gets MA only (no EL roll-outs)
    retain_el = None if config.retain_el else -1.0
    before = _score(model, forget_set, pad_id, config, "scoring forget set")
    retain_before = _score(model, retain_eval, pad_id, config, "scoring retain set", el_max_ma=retain_el) if len(retain_eval) else None
    state = _State(scores=before, active=_active(before, thresholds, config), epochs_active=[0] * len(forget_set))
    history = [dict(epoch=0, active=sum(state.active), **{f"{k}_mean": v for k, v in before.mean().items()})]
    per_epoch = [before]  # per-sample scores of every epoch, for the report's plots
    logger.info("epoch 0: MA %.4f EL %.4f, %d of %d samples still to forget", before.mean()["ma"],
                before.mean()["el"], sum(state.active), len(forget_set))

    # 4. IUR: train on what is still remembered, re-score, repeat
    status, steps, epoch = "max_epochs", 0, 0
    good = _lora_state(model)
    rank, world = accelerator.process_index, accelerator.num_processes
    gen = torch.Generator().manual_seed(config.seed)
    epoch_bar = _bar(config.max_epochs, "epochs", show)
    # Lazy EL: a sample whose MA fails is not forgotten whatever its EL, so skip the costly roll-outs
    # (not without IUR, whose stop rule needs the set's mean EL).
    lazy_ma = thresholds.ma if config.lazy_el and config.iur and config.criterion == "ma_el" else None
    for epoch in range(1, config.max_epochs + 1):
        active_idx = [i for i, a in enumerate(state.active) if a]
        if not active_idx and epoch > config.min_epochs:
            status = "forgotten"
            epoch -= 1
            break
        if not active_idx:  # min_epochs asks for more: keep pushing on every sample
            active_idx = list(range(len(forget_set)))
        order = [active_idx[i] for i in torch.randperm(len(active_idx), generator=gen).tolist()]
        model.train()
        terms = {"loss": 0.0, "l_fgt": 0.0, "l_lrn": 0.0, "l_kl": 0.0}
        nsteps = math.ceil(len(order) / config.batch_size)
        nan = False
        for b in range(nsteps):
            batch = order[b * config.batch_size:(b + 1) * config.batch_size]
            mine = batch[rank::world]
            weight = 1.0
            if not mine:  # fewer samples than processes: join the gradient sync with a zero loss
                mine, weight = batch[:1], 0.0
            f_seqs = [forget_set.input_ids[i] for i in mine]
            n_seqs = [retain_set.input_ids[j] for i in mine for j in neighbours[i].tolist()]
            if config.retain_kl_samples and len(retain_set):
                extra = torch.randint(len(retain_set), (config.retain_kl_samples,), generator=gen).tolist()
                n_seqs += [retain_set.input_ids[j] for j in extra]
            f_weights = [distinct[i] for i in mine] if distinct else None
            optimizer.zero_grad(set_to_none=True)
            out = icu_step_backward(model, f_seqs, n_seqs, pad_id, config, reference, f_weights, scale=weight,
                                    backbone=train_backbone)
            if not math.isfinite(out["loss"]):
                nan = True
                break
            if world > 1:
                # LoRA gradients are tiny: average them explicitly rather than wrap in DDP, because
                # the loss calls the backbone directly (chunked logits), which DDP's forward hook misses.
                for p in trainable:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = accelerator.reduce(p.grad, reduction="mean")
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            steps += 1
            for k in terms:
                terms[k] += float(out[k].detach() if torch.is_tensor(out[k]) else out[k]) / nsteps
        for i in active_idx:
            state.epochs_active[i] += 1
        if nan or any(not torch.isfinite(p).all() for p in trainable):
            _restore(model, good)
            status = "nan_restored"
            logger.error("non-finite loss or weights in epoch %d: restored the adapter weights of epoch %d and stopped",
                         epoch, epoch - 1)
            epoch -= 1
            break
        good = _lora_state(model)
        state.scores = _score(model, forget_set, pad_id, config, f"scoring epoch {epoch}", el_max_ma=lazy_ma)
        per_epoch.append(state.scores)
        state.active = _active(state.scores, thresholds, config)
        m = state.scores.mean()
        history.append(dict(epoch=epoch, active=sum(state.active), **terms, **{f"{k}_mean": v for k, v in m.items()}))
        logger.info("epoch %d: loss %.4f (fgt %.4f lrn %.4f kl %.4f) MA %.4f EL %s NLL %.3f, %d still to forget",
                    epoch, terms["loss"], terms["l_fgt"], terms["l_lrn"], terms["l_kl"], m["ma"],
                    _fmt_el(m["el"]), m["nll"], sum(state.active))
        epoch_bar.update(1)
        epoch_bar.set_postfix(active=sum(state.active), ma=f"{m['ma']:.3f}")
    else:
        if not any(state.active):
            status = "forgotten"
    epoch_bar.close()
    model.eval()
    calibration = None
    if thresholds.nll is not None:
        lora_b = [p for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
        if status != "forgotten" or not lora_b:
            logger.warning("nll_target: adapter not calibrated (%s)",
                           "no LoRA adapter to scale" if not lora_b else "not every sample is forgotten")
        else:
            calibration, state.scores = calibrate_nll(
                lora_b, lambda: _score(model, forget_set, pad_id, config, "calibrating", el_max_ma=lazy_ma),
                state.scores, thresholds, config.criterion, config.nll_tolerance, config.nll_max_scale,
                config.nll_probes)
            per_epoch[-1] = state.scores
            logger.info("nll_target: adapter scaled by %.3f; forget set's mean NLL %.3f -> %.3f (target %.3f, %d probes)",
                        calibration.scale, calibration.nll_before, calibration.nll_after, calibration.target,
                        calibration.probes)
    in_sync = None
    if world > 1:
        # every rank must hold the same adapter; a cheap checksum per rank proves it
        checksum = torch.stack([p.detach().double().sum() for p in trainable]).sum().reshape(1).to(accelerator.device)
        gathered = accelerator.gather(checksum).cpu()
        in_sync = bool(torch.allclose(gathered, gathered[0].expand_as(gathered), rtol=0, atol=1e-9))
    if any(e is None for e in state.scores.el):  # lazy scoring left gaps: the report gets complete scores
        state.scores = _score(model, forget_set, pad_id, config, "scoring forget set")
        per_epoch[-1] = state.scores
    retain_after = _score(model, retain_eval, pad_id, config, "scoring retain set", el_max_ma=retain_el) if len(retain_eval) else None

    # 5. the report (= manifest): scores by salted hash, never text
    after = state.scores
    done = forgotten_mask(after, thresholds, config.criterion)
    samples = []
    for i, sid in enumerate(forget_set.ids):
        row = {"id": sid, "tokens": forget_set.lengths[i],
               "before": {"ma": before.ma[i], "el": before.el[i]}, "after": {"ma": after.ma[i], "el": after.el[i]},
               "forgotten": bool(done[i]), "epochs_active": state.epochs_active[i]}
        if before.bleu is not None:
            row["before"]["bleu"], row["after"]["bleu"] = before.bleu[i], after.bleu[i]
        if before.nll is not None and after.nll is not None:
            row["before"]["nll"], row["after"]["nll"] = before.nll[i], after.nll[i]
        samples.append(row)
    cfg = config.to_dict()
    cfg.pop("hash_salt", None)
    report = {
        "format": MANIFEST_FORMAT,
        "request_id": request_id,
        "created_at": utc_now(),
        "method": "icu",
        "status": status,
        "base": {"name_or_path": config.model or getattr(base_model.config, "_name_or_path", None),
                 "gguf_file": config.gguf_file, "quantized": bool(getattr(base_model, "is_loaded_in_4bit", False)),
                 "fingerprint": fingerprint},
        "config": cfg,
        "salt": salt,
        "thresholds": thresholds.to_dict(),
        "retain": {"source": retain_source, "count": len(retain_set),
                   "before": retain_before.mean() if retain_before else None,
                   "after": retain_after.mean() if retain_after else None},
        "forget": {"count": len(forget_set), "truncated": forget_set.truncated, "forgotten": int(sum(done)),
                   "before": before.mean(), "after": after.mean()},
        "samples": samples,
        "history": history,
        "per_sample_history": {sid: {"ma": [s.ma[i] for s in per_epoch], "el": [s.el[i] for s in per_epoch]}
                               for i, sid in enumerate(forget_set.ids)},
        "mia": forget_mia(model, tokenizer, forget_set.input_ids, unseen_texts, config.max_length,
                          batch_size=config.score_batch_size) if unseen_texts else None,
        "stacked_on": _stacked_on(base_model),
        "epochs": epoch,
        "steps": steps,
        "world_size": world,
        "ranks_in_sync": in_sync,
        "device": str(accelerator.device),
        "wall_time_s": round(time.time() - t0, 2),
        "calibration": calibration.to_dict() if calibration else None,
        "reference_cache": {"hits": reference.hits, "misses": reference.misses, "mb": round(reference.bytes / 2**20, 1)},
        "prefix_cache": ({"layers": train_backbone.start, "hits": train_backbone.prefix.hits,
                          "misses": train_backbone.prefix.misses, "mb": round(train_backbone.prefix.bytes / 2**20, 1)}
                         if train_backbone else None),
        **{k: round(v, 1) for k, v in peak_memory_mb().items()},
        "versions": library_versions(),
    }
    logger.info("%s: %d of %d samples forgotten after %d epochs (%d steps), %.1f s", status, sum(done),
                len(forget_set), epoch, steps, report["wall_time_s"])

    out_path = None
    if output_dir is not None and main:
        out_path = save_forget_adapter(model, report, output_dir, overwrite)
    accelerator.wait_for_everyone()
    return ForgetResult(model=model, tokenizer=tokenizer, report=report, output_dir=out_path)


def save_forget_adapter(model, report: dict, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the PEFT adapter (safetensors) and its manifest, atomically."""
    with atomic_output_dir(output_dir, overwrite) as tmp:
        if hasattr(model, "peft_config"):
            # only this request's adapter: in a sequential stack the others are already saved
            model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=["default"])
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
        write_report(report, tmp)  # before the manifest, so the report files are hashed too
        report.update(write_manifest(tmp, report))
    return Path(output_dir)


__all__ = ["forget", "ForgetResult", "save_forget_adapter", "icu_step_loss", "ICUError"]
