"""Memorisation metrics of Jang et al. (2022) and ICU: MA, EL_n, generated-suffix BLEU.

Pure functions (`*_from_*`) take tensors / token lists and are what tests check against hand-made
cases; the model-facing functions batch the work and use the KV cache.

MA(x)   = (1/(T-1)) sum_{t=1..T-1} 1[argmax p(.|x_<t) == x_t]
EL_n(x) = (1/(T-n)) sum_{t=1..T-n} OVERLAP_n(greedy(x_<t), x_>=t)   (ICU's variant: t >= el_start)
OVERLAP_n(a, b) = fraction of the n-grams of a that occur in b.
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .allocator import heap_blocks
from .data import pad_batch


# ------------------------------------------------------------------------------ pure functions

def ngrams(tokens: Sequence[int], n: int) -> List[Tuple[int, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def ngram_overlap(generated: Sequence[int], reference: Sequence[int], n: int) -> float:
    """Fraction of the n-grams of `generated` that occur in `reference` (0 if it has none)."""
    gen = ngrams(list(generated), n)
    if not gen:
        return 0.0
    ref = set(ngrams(list(reference), n))
    return sum(g in ref for g in gen) / len(gen)


def ma_from_predictions(predictions: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MA. `predictions[b, t]` is the argmax at position t (predicting labels[b, t+1])."""
    hit = (predictions[:, :-1] == labels[:, 1:])
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return (hit & valid).sum(1).float() / valid.sum(1).clamp(min=1).float()


def el_from_continuations(tokens: Sequence[int], continuations: Dict[int, Sequence[int]], n: int) -> float:
    """EL_n of one sample given the greedy continuation of each scored prefix length t.

    `continuations[t]` continues tokens[:t] and is compared with tokens[t:].
    """
    if not continuations:
        return 0.0
    total = sum(ngram_overlap(cont, tokens[t:], n) for t, cont in continuations.items())
    return total / len(continuations)


def sentence_bleu(candidate: Sequence[int], reference: Sequence[int], max_n: int = 4) -> float:
    """BLEU-max_n of one candidate against one reference (token ids), no smoothing, with brevity penalty."""
    if not candidate or not reference:
        return 0.0
    log_p = 0.0
    for n in range(1, max_n + 1):
        cand = Counter(ngrams(list(candidate), n))
        ref = Counter(ngrams(list(reference), n))
        total = sum(cand.values())
        if total == 0:
            return 0.0
        clipped = sum(min(c, ref[g]) for g, c in cand.items())
        if clipped == 0:
            return 0.0
        log_p += math.log(clipped / total) / max_n
    c, r = len(candidate), len(reference)
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(log_p)


# ------------------------------------------------------------------------------ model access

def model_device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def _causal_lm(model):
    """The transformers causal LM inside a PeftModel (adapters stay active), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_head(model):
    """(backbone, head) such that head(backbone(ids).last_hidden_state) == model(ids).logits.

    Computing the head ourselves, chunk by chunk, keeps the (batch, length, vocab) logits from ever
    existing in full. Returns None when the model post-processes its logits (soft-capping,
    scaling...), which the first call checks once on a short input.
    """
    causal = _causal_lm(model)
    cached = getattr(causal, "_icu_backbone_ok", None)
    backbone, head = getattr(causal, "base_model", None), causal.get_output_embeddings()
    if backbone is None or backbone is causal or head is None:
        return None
    override = getattr(causal, "_icu_backbone_override", None)
    if override is not None and cached:
        return override, head
    if cached is None:
        device = model_device(model)
        ids = torch.tensor([[1, 2, 3, 4]], device=device) % causal.config.vocab_size
        with torch.no_grad():
            full = causal(input_ids=ids).logits.float()
            mine = head(backbone(input_ids=ids).last_hidden_state).float()
        cached = bool(torch.allclose(full, mine, atol=1e-4, rtol=1e-4))
        causal._icu_backbone_ok = cached
    return (backbone, head) if cached else None


@contextmanager
def backbone_override(model, backbone):
    """Within: the teacher-forced passes over `model` (teacher_forced, next_token_stats, score_samples' MA and
    NLL) compute its final hidden states with `backbone` (a caches.FrozenPrefixBackbone: the same hidden
    states, the frozen layers below the adapter run once per sample) and its own head. Greedy roll-outs call
    the model itself. `backbone` None: no change."""
    causal = _causal_lm(model)
    if backbone is None or backbone_and_head(model) is None:
        yield
        return
    before = getattr(causal, "_icu_backbone_override", None)
    causal._icu_backbone_override = backbone
    try:
        yield
    finally:
        causal._icu_backbone_override = before


@dataclass
class TeacherForced:
    """Per-position statistics of a teacher-forced pass over right-padded sequences."""

    predictions: torch.Tensor  # (B, T) argmax at each position
    target_logprobs: torch.Tensor  # (B, T-1) log p(x_{t+1} | x_<=t)
    mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T)

    @property
    def valid(self) -> torch.Tensor:
        return (self.mask[:, 1:] * self.mask[:, :-1]).bool()

    def ma(self) -> torch.Tensor:
        return ma_from_predictions(self.predictions, self.labels, self.mask)

    def nll(self) -> torch.Tensor:
        v = self.valid
        return -(self.target_logprobs * v).sum(1) / v.sum(1).clamp(min=1)


@torch.no_grad()
def teacher_forced(model, seqs: Sequence[torch.Tensor], pad_id: int, chunk_size: int = 64) -> TeacherForced:
    """One forward pass; argmax and target log-prob at every position, logits chunked."""
    device = model_device(model)
    ids, mask = pad_batch(seqs, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    parts = backbone_and_head(model)
    if parts is None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden, head = logits, (lambda x: x)
    else:
        backbone, head = parts
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    preds, tlp = [], []
    for s in range(0, ids.shape[1], chunk_size):
        lp = F.log_softmax(head(hidden[:, s:s + chunk_size]).float(), dim=-1)
        preds.append(lp.argmax(-1))
        nxt = ids[:, s + 1:s + chunk_size + 1]
        tlp.append(lp[:, : nxt.shape[1]].gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
    return TeacherForced(torch.cat(preds, 1).cpu(), torch.cat(tlp, 1).cpu(), mask.cpu(), ids.cpu())


def _chunked_log_probs(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int, chunk_size: int):
    """Per batch of `seqs`: (the batch, its padded ids on the model's device, its mask, and an iterator of
    (s, log-probs of the next token at positions s..e-1) over position chunks). The head runs chunk by
    chunk (backbone_and_head), so the whole (batch, length, vocab) logits never exist."""
    device = model_device(model)
    parts = backbone_and_head(model)
    for b in range(0, len(seqs), batch_size):
        chunk = list(seqs[b:b + batch_size])
        ids, mask = pad_batch(chunk, pad_id)
        ids, mask = ids.to(device), mask.to(device)
        if parts is None:
            hidden, head = model(input_ids=ids, attention_mask=mask).logits, (lambda x: x)
        else:
            hidden, head = parts[0](input_ids=ids, attention_mask=mask).last_hidden_state, parts[1]
        last = ids.shape[1] - 1
        yield chunk, ids, mask, ((s, F.log_softmax(head(hidden[:, s:min(s + chunk_size, last)]).float(), dim=-1))
                                 for s in range(0, last, chunk_size))


@torch.no_grad()
def next_token_entropies(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int = 16,
                         chunk_size: int = 64) -> List[torch.Tensor]:
    """Per sequence, (T-1,): the entropy (nats) of `model`'s next-token distribution at each position.

    Min-K%++ reads the true token's log-prob against this distribution's mean and spread, so calibrated
    forgetting (calibrate.entropy_targets) gives each forget position an entropy as well as a loss.
    """
    return next_token_stats(model, seqs, pad_id, batch_size, chunk_size, entropy=True)[2]


@torch.no_grad()
def next_token_stats(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int = 16,
                     chunk_size: int = 64, entropy: bool = False) -> tuple:
    """Per sequence, (T-1,) tensors: the NLL of each next token, and the log-prob of the best other token;
    with `entropy`, a third list: the next-token entropy at each position (next_token_entropies), from
    the same pass.

    What calibrated forgetting needs to know about the base before training (calibrate.token_targets):
    how likely each true token is, and by how much it beats the runner-up.
    """
    lists: Tuple[List[torch.Tensor], ...] = ([], [], []) if entropy else ([], [])
    for chunk, ids, _, chunks in _chunked_log_probs(model, seqs, pad_id, batch_size, chunk_size):
        parts: Tuple[list, ...] = tuple([] for _ in lists)
        for s, lp in chunks:
            nxt = ids[:, s + 1:s + 1 + lp.shape[1]]
            parts[0].append(-lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
            parts[1].append(lp.scatter(-1, nxt.unsqueeze(-1), float("-inf")).max(-1).values)
            if entropy:
                parts[2].append(-(lp.exp() * lp).sum(-1))
        for out, part in zip(lists, parts):
            whole = torch.cat(part, 1).cpu()
            out.extend(whole[row, : len(x) - 1].clone() for row, x in enumerate(chunk))
    return lists


def _forward_last(model, **kw):
    """Forward pass keeping only the last position's logits where the model supports it."""
    try:
        return model(logits_to_keep=1, **kw)
    except TypeError:
        return model(**kw)


@torch.no_grad()
def greedy_continue(model, contexts: Sequence[torch.Tensor], num_new: Sequence[int], pad_id: int,
                    batch_size: int = 16, progress=None) -> List[List[int]]:
    """Greedy continuation of each context by num_new[i] tokens, batched, with the KV cache.

    A hand-written loop rather than `generate`: no early stop at EOS and no logits processors, so the
    continuation is exactly the argmax path the EL_n definition asks for.
    """
    with heap_blocks():  # each token grows every layer's KV cache by a new tensor: reuse, not fresh pages
        return _greedy_continue(model, contexts, num_new, pad_id, batch_size, progress)


def _greedy_continue(model, contexts, num_new, pad_id, batch_size, progress) -> List[List[int]]:
    device = model_device(model)

    def start(idx):  # each context's own pass, left-padded: its cache and the first token
        ids, mask = pad_batch([contexts[i] for i in idx], pad_id, side="left")
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = _forward_last(model, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        return out.logits[:, -1].argmax(-1), mask, pos[:, -1:], _out_cache(out)

    return _decode_in_batches(model, num_new, [len(c) for c in contexts], batch_size, progress, start)


# Greedy decoding feeds one token per row through the whole model: at 16 rows a step on the CPU is bound by
# reading the weights, not by arithmetic. More rows per batch amortise that read; each row holds a KV cache.
ROLLOUT_ROWS_MAX = 64


def kv_bytes_per_token(model_config, elem_bytes: int = 4) -> Optional[int]:
    """Bytes of KV cache one token of one row holds (keys and values of every layer), from the config's
    layer count, key-value heads and head size; None where the config does not say."""
    layers = getattr(model_config, "num_hidden_layers", None) or getattr(model_config, "n_layer", None)
    heads = getattr(model_config, "num_attention_heads", None) or getattr(model_config, "n_head", None)
    width = getattr(model_config, "hidden_size", None) or getattr(model_config, "n_embd", None)
    if not (layers and heads and width):
        return None
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or width // heads
    return int(layers) * 2 * int(kv_heads) * int(head_dim) * elem_bytes


def rollout_rows(kv_per_token: Optional[int], vocab: Optional[int], length: int, batch_size: int,
                 cap: int = ROLLOUT_ROWS_MAX) -> int:
    """Roll-outs per decoding batch: as many rows as fit, with their KV caches of `length` tokens, in the
    memory a teacher-forced scoring batch of `batch_size` rows already takes for its logits (a chunk of up to
    64 positions over the vocabulary, float32), at most `cap`, never fewer than `batch_size`. Without the
    model's sizes: `batch_size`."""
    if not kv_per_token or not vocab or length < 1:
        return batch_size
    budget = batch_size * min(64, length) * int(vocab) * 4
    return max(batch_size, min(cap, budget // (kv_per_token * length)))


def _rollout_rows(model, seqs: Sequence[torch.Tensor], batch_size: int) -> int:
    config = getattr(_causal_lm(model), "config", None)
    if config is None or not seqs:
        return batch_size
    return rollout_rows(kv_bytes_per_token(config), getattr(config, "vocab_size", None),
                        max(len(x) for x in seqs), batch_size, ROLLOUT_ROWS_MAX)


def _decode_in_batches(model, num_new: Sequence[int], lengths: Sequence[int], batch_size: int, progress,
                       start) -> List[List[int]]:
    """num_new[i] greedy tokens for each roll-out i, in batches of similar length (the longest first, so a
    batch pads little). `start(idx)` gives a batch's (first tokens, mask, last positions, KV cache) as
    _decode takes them; `progress` moves by each batch's size."""
    order = sorted(range(len(num_new)), key=lambda i: (-num_new[i], -lengths[i]))
    result: List[Optional[List[int]]] = [None] * len(num_new)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        gen_t = _decode(model, *start(idx), [num_new[i] for i in idx])
        for row, i in enumerate(idx):
            result[i] = gen_t[row, : num_new[i]].tolist()
        if progress is not None:
            progress.update(len(idx))
    return result  # type: ignore[return-value]


def _cache_arg(model) -> str:
    """The forward argument that takes a KV cache: `cache` from transformers 5 (where `past_key_values` is
    deprecated, to be removed in 5.40), `past_key_values` before."""
    import inspect

    forward = type(_causal_lm(model)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _out_cache(out):
    """The KV cache a forward returned (`cache` from transformers 5, `past_key_values` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _decode(model, first: torch.Tensor, mask: torch.Tensor, last_pos: torch.Tensor, past,
            steps: Sequence[int]) -> torch.Tensor:
    """(rows, max(steps)) greedy tokens: `first`, then more, each fed back with the KV cache `past` (which
    holds the contexts, left-padded as `mask` says; `last_pos` (rows, 1) is each context's last position).
    Row r is decoded for steps[r] tokens; the rest of its row is padding (0).

    Rows that have all their tokens leave the batch (`_drop_done`): a batch of roll-outs sorted longest
    first runs as many steps as its longest, and with every row kept to the end a text's roll-outs (one per
    deviation, of every length up to the text's) cost about twice their tokens."""
    want = torch.as_tensor(list(steps), dtype=torch.long)
    rows, total = len(want), int(want.max()) if len(want) else 0
    out_tokens = torch.zeros((rows, max(total, 1)), dtype=torch.long)
    out_tokens[:, 0] = first.cpu()
    alive = torch.arange(rows)  # the original row of each row still in the batch
    shrink = _plain_kv(past) is not None and hasattr(past, "batch_select_indices")
    nxt, arg = first, _cache_arg(model)
    for t in range(1, total):
        if shrink:
            keep = _drop_done(want[alive], t)
            if keep is not None:
                alive, keep = alive[keep], keep.to(mask.device)
                past.batch_select_indices(keep)
                mask, last_pos, nxt = mask[keep], last_pos[keep], nxt[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos, use_cache=True,
                    **{arg: past})
        past = _out_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        out_tokens[alive, t] = nxt.cpu()
    return out_tokens


def _drop_done(want: torch.Tensor, t: int) -> Optional[torch.Tensor]:
    """The rows to keep before decoding token t, given each row's wanted count (`want`); None to keep them all.
    Rows are dropped once a quarter of the batch is done: each drop copies the whole KV cache, so dropping in
    geometric steps keeps the copies to a few caches' worth."""
    done = want <= t
    n_done = int(done.sum())
    if n_done == 0 or n_done < max(1, len(want) // 4) and n_done < len(want):
        return None
    return (~done).nonzero().flatten()


def _plain_kv(cache) -> Optional[List[Tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer (keys, values), each (batch, heads, length, head_dim), of a transformers DynamicCache whose
    layers all hold every position (no sliding window, no recurrent state); None for any other cache."""
    layers = getattr(cache, "layers", None)
    if type(cache).__name__ != "DynamicCache" or not layers:
        return None
    if any(type(layer).__name__ != "DynamicLayer" or getattr(layer, "keys", None) is None
           or layer.keys.dim() != 4 for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


@torch.no_grad()
def rollouts_from_text(model, seqs: Sequence[torch.Tensor], rows: Sequence[Tuple[int, int]], first: Sequence[int],
                       num_new: Sequence[int], pad_id: int, batch_size: int = 16,
                       progress=None, rows_per_batch: Optional[int] = None) -> Optional[List[List[int]]]:
    """greedy_continue(model, [seqs[b][:d] for (b, d) in rows], num_new) without running the contexts again.

    Every context here is a prefix of a text: one forward pass over each text gives the KV cache of all
    its prefixes at once (causal attention: the keys and values at positions < d do not depend on what
    follows), and the teacher-forced pass already gave each roll-out's first token (`first[i]`, the
    argmax after seqs[b][:d]). Each batch of roll-outs starts from a cache assembled from those slices,
    left-padded. On the quick demo's never-planted records the contexts' own passes were ~22% of the
    roll-outs' time (a text of T tokens has ~T roll-outs whose contexts sum to ~T^2 / 2 tokens).
    `batch_size` texts run together; the roll-outs decode `rows_per_batch` (default: batch_size) at a time.
    Returns None where the model's cache is not a plain per-layer KV cache (the caller rolls out as
    before)."""
    from transformers import DynamicCache

    with heap_blocks():
        device = model_device(model)
        need: Dict[int, int] = {}
        for b, d in rows:
            need[b] = max(need.get(b, 0), d)
        texts = sorted(need)
        kv: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        for s in range(0, len(texts), batch_size):
            part = texts[s:s + batch_size]
            ids, mask = pad_batch([seqs[b][: need[b]] for b in part], pad_id)
            out = _forward_last(model, input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True)
            layers = _plain_kv(_out_cache(out))
            if layers is None:
                return None
            for r, b in enumerate(part):
                kv[b] = [(k[r], v[r]) for k, v in layers]

        def start(idx):  # the texts' cache slices, left-padded; the first tokens from the teacher-forced pass
            width = max(rows[i][1] for i in idx)
            mask = torch.zeros((len(idx), width), dtype=torch.long, device=device)
            layers = []
            for li, (k0, v0) in enumerate(kv[rows[idx[0]][0]]):
                keys = k0.new_zeros((len(idx), k0.shape[0], width, k0.shape[-1]))
                values = v0.new_zeros((len(idx), v0.shape[0], width, v0.shape[-1]))
                for r, i in enumerate(idx):
                    b, d = rows[i]
                    keys[r, :, width - d:] = kv[b][li][0][:, :d]
                    values[r, :, width - d:] = kv[b][li][1][:, :d]
                layers.append((keys, values))
            for r, i in enumerate(idx):
                mask[r, width - rows[i][1]:] = 1
            last_pos = torch.tensor([[rows[i][1] - 1] for i in idx], device=device)
            first_t = torch.tensor([first[i] for i in idx], device=device)
            return first_t, mask, last_pos, DynamicCache(ddp_cache_data=layers)

        return _decode_in_batches(model, num_new, [d for _, d in rows], rows_per_batch or batch_size, progress, start)


class _Share:
    """A progress bar seen through `share` of its total, spread over `count` updates of 1."""

    def __init__(self, bar, share: float, count: int):
        self.bar, self.step = bar, share / max(count, 1)

    def update(self, k: int) -> None:
        self.bar.update(k * self.step)


@torch.no_grad()
def extraction_likelihood(model, seqs: Sequence[torch.Tensor], n: int, pad_id: int, start: int = 1,
                          batch_size: int = 16, tf: Optional[TeacherForced] = None, progress=None,
                          progress_share: Optional[float] = None) -> List[float]:
    """EL_n of each sequence, scoring prefix lengths t = max(start, 1) .. T-n.

    Greedy continuations share work: if argmax p(.|x_<t) == x_t, the continuation of prefix t is x_t
    followed by the continuation of prefix t+1. Only prefixes ending where the model deviates from
    the text (d with argmax p(.|x_<d) != x_d) need a fresh roll-out, of length T-d; every other
    continuation is spliced from the text and those roll-outs. A memorised sample thus costs a few
    roll-outs instead of T-n of them. The result equals the naive definition (see tests). The roll-outs
    decode in batches of rollout_rows (up to 64 rows, as many as their KV caches fit in a scoring batch's
    logits memory); `batch_size` texts run their teacher-forced passes together. `progress` counts
    roll-outs, or with `progress_share`, moves that much in all (a share of a bar that counts samples: the
    roll-outs of never-seen text take minutes, and the bar must move).
    """
    if tf is None:
        tf = teacher_forced(model, seqs, pad_id)
    contexts, num_new, keys, first = [], [], [], []
    plans = []
    for b, x in enumerate(seqs):
        T = len(x)
        preds = tf.predictions[b, : T - 1]  # preds[t-1] predicts x[t]
        t_lo = max(start, 1)
        t_hi = T - n  # inclusive; suffix must hold at least one n-gram
        deviations = [d for d in range(t_lo, T) if int(preds[d - 1]) != int(x[d])]
        for d in deviations:
            if d <= T - 1:
                contexts.append(x[:d])
                num_new.append(T - d)
                keys.append((b, d))
                first.append(int(preds[d - 1]))
        plans.append((t_lo, t_hi, deviations))
    if progress is not None and progress_share is not None:
        if not contexts:  # nothing to roll out: the share moves at once
            progress.update(progress_share)
            progress = None
        else:
            progress = _Share(progress, progress_share, len(contexts))
    # decoding batches sized by memory (rollout_rows): the same tokens, fewer passes over the weights (the
    # default demo's final EL_10 of its 8 never-planted records: 39.7 -> 24.6 s on 2 threads)
    rows = _rollout_rows(model, seqs, batch_size)
    rolled = rollouts_from_text(model, seqs, keys, first, num_new, pad_id, batch_size, progress,
                                rows_per_batch=rows) if contexts else []
    if rolled is None:  # not a plain KV cache: each context runs again
        rolled = greedy_continue(model, contexts, num_new, pad_id, batch_size=batch_size, progress=progress)
    rollouts = {k: r for k, r in zip(keys, rolled)}
    scores = []
    for b, x in enumerate(seqs):
        t_lo, t_hi, deviations = plans[b]
        tokens = x.tolist()
        T = len(tokens)
        conts: Dict[int, List[int]] = {}
        nxt_dev = None
        di = len(deviations) - 1
        for t in range(t_hi, t_lo - 1, -1):
            while di >= 0 and deviations[di] >= t:
                nxt_dev = deviations[di]
                di -= 1
            if nxt_dev is None:
                conts[t] = tokens[t:]
            else:
                conts[t] = tokens[t:nxt_dev] + rollouts[(b, nxt_dev)]
            # keep nxt_dev as the smallest deviation >= t
        scores.append(el_from_continuations(tokens, conts, n))
    return scores


@torch.no_grad()
def suffix_bleu(model, seqs: Sequence[torch.Tensor], pad_id: int, prefix_tokens: int = 50, suffix_tokens: int = 50,
                batch_size: int = 16, progress=None) -> List[float]:
    """ICU's IUR signal: BLEU-4 of the greedy continuation of a prefix against the true suffix.

    (ICU's code uses beam 2 and adds BERTScore; we use greedy and BLEU only, offline.)
    Sequences shorter than prefix+1 tokens use half their length as prefix.
    """
    contexts, refs, num_new = [], [], []
    for x in seqs:
        p = prefix_tokens if len(x) > prefix_tokens else max(1, len(x) // 2)
        ref = x[p:p + suffix_tokens].tolist()
        contexts.append(x[:p])
        refs.append(ref)
        num_new.append(len(ref))
    gens = greedy_continue(model, contexts, num_new, pad_id, batch_size=batch_size, progress=progress)
    return [sentence_bleu(g, r) for g, r in zip(gens, refs)]


@dataclass
class Scores:
    """Per-sample memorisation scores of one set under one model state."""

    ma: List[float]
    el: List[Optional[float]]  # None: not computed (lazy scoring skips EL where MA already fails)
    bleu: Optional[List[float]] = None
    nll: Optional[List[float]] = None  # mean next-token NLL of each sample (what a loss attack sees)
    # per sample: its EL_n was taken as under the edge, not measured (the forget loop's deferred EL_n)
    presumed: Optional[List[bool]] = None

    def mean(self) -> Dict[str, Optional[float]]:
        """Means over the set; EL's mean covers the samples it was computed for (None if none)."""
        els = [e for e in self.el if e is not None]
        out = {"ma": float(sum(self.ma) / len(self.ma)), "el": float(sum(els) / len(els)) if els else None}
        if self.bleu is not None:
            out["bleu"] = float(sum(self.bleu) / len(self.bleu))
        if self.nll is not None:
            out["nll"] = float(sum(self.nll) / len(self.nll))
        return out

    @classmethod
    def concat(cls, parts: Sequence["Scores"]) -> "Scores":
        """One Scores holding `parts` one after another (the same samples scored under several models)."""
        if len(parts) == 1:
            return parts[0]

        def joined(name):
            lists = [getattr(p, name) for p in parts]
            return None if any(x is None for x in lists) else [v for x in lists for v in x]

        return cls(ma=joined("ma"), el=joined("el"), bleu=joined("bleu"), nll=joined("nll"))

    def split(self, n: int) -> List["Scores"]:
        """The inverse of concat for parts of `n` samples each."""
        def part(x, k):
            return None if x is None else x[k:k + n]

        return [Scores(ma=part(self.ma, k), el=part(self.el, k), bleu=part(self.bleu, k), nll=part(self.nll, k))
                for k in range(0, len(self.ma), n)]


@torch.no_grad()
def score_samples(model, seqs: Sequence[torch.Tensor], pad_id: int, el_n: int = 10, el_start: int = 1,
                  batch_size: int = 16, with_bleu: bool = False, bleu_prefix: int = 50, bleu_suffix: int = 50,
                  progress=None, el_max_ma: Optional[float] = None, el_min_nll: Optional[float] = None,
                  el_for: Optional[Sequence[bool]] = None) -> Scores:
    """MA and EL_n (and optionally suffix BLEU) of every sequence, in batches.

    el_max_ma: compute EL_n only for sequences whose MA is at or below this value, None elsewhere;
    el_min_nll likewise skips sequences whose mean NLL is below it (still too likely to be forgotten);
    el_for (one flag per sequence) skips those whose flag is False.
    EL_n on text the model no longer reproduces costs a greedy roll-out per position (quadratic in
    the length), so IUR skips it where the cheap MA already says "not forgotten yet".
    """
    ma, el, bleu, nll = [], [], [], []
    for s in range(0, len(seqs), batch_size):
        chunk = list(seqs[s:s + batch_size])
        tf = teacher_forced(model, chunk, pad_id)
        chunk_ma, chunk_nll = tf.ma().tolist(), tf.nll().tolist()
        ma.extend(chunk_ma)
        nll.extend(chunk_nll)
        # the roll-outs move the bar by most of the chunk's share as they go (a chunk of never-seen text
        # can take minutes); the rest moves when the chunk is done
        share = 0.9 * len(chunk) if progress is not None else None
        moved = 0.0
        if el_max_ma is None and el_min_nll is None and el_for is None:
            el.extend(extraction_likelihood(model, chunk, el_n, pad_id, start=el_start, batch_size=batch_size, tf=tf,
                                            progress=progress, progress_share=share))
            moved = share or 0.0
        else:
            keep = [i for i, (m, n) in enumerate(zip(chunk_ma, chunk_nll))
                    if (el_max_ma is None or m <= el_max_ma) and (el_min_nll is None or n >= el_min_nll)
                    and (el_for is None or el_for[s + i])]
            values: List[Optional[float]] = [None] * len(chunk)
            if keep:
                sub = TeacherForced(tf.predictions[keep], tf.target_logprobs[keep], tf.mask[keep], tf.labels[keep])
                for i, v in zip(keep, extraction_likelihood(model, [chunk[i] for i in keep], el_n, pad_id,
                                                            start=el_start, batch_size=batch_size, tf=sub,
                                                            progress=progress, progress_share=share)):
                    values[i] = v
                moved = share or 0.0
            el.extend(values)
        if with_bleu:
            bleu.extend(suffix_bleu(model, chunk, pad_id, bleu_prefix, bleu_suffix, batch_size))
        if progress is not None:
            progress.update(len(chunk) - moved)
    return Scores(ma=ma, el=el, bleu=bleu if with_bleu else None, nll=nll)


# ------------------------------------------------------------------------------ perplexity

def sliding_windows(length: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """(begin, end, first_target) windows covering a sequence of `length` tokens.

    Each window feeds tokens [begin, end) and scores the targets first_target..end-1, so every
    token from position 1 on is scored exactly once, each with at least window - stride tokens of
    context once the first window is full (the transformers perplexity recipe). Position 0 has no
    context and is never scored.
    """
    if window < 2:
        raise ValueError("window must be >= 2")
    if not 1 <= stride <= window:
        raise ValueError("stride must be in 1..window")
    out, prev_end, begin = [], 1, 0
    while prev_end < length:
        end = min(begin + window, length)
        out.append((begin, end, prev_end))
        prev_end = end
        begin = end - (window - stride) if end < length else end
        begin = max(0, min(begin, end - 1))
    return out


def perplexity_from_nll(total_nll: float, count: int) -> float:
    """exp(mean NLL); inf for no scored tokens."""
    return math.exp(total_nll / count) if count else float("inf")


@dataclass
class Perplexity:
    """Per-sample and corpus perplexity. The corpus value weights every token equally."""

    per_sample: List[float]
    nll_sums: List[float]
    token_counts: List[int]

    @property
    def corpus(self) -> float:
        return perplexity_from_nll(sum(self.nll_sums), sum(self.token_counts))


@torch.no_grad()
def perplexity(model, seqs: Sequence[torch.Tensor], pad_id: int, window: Optional[int] = None,
               stride: Optional[int] = None, batch_size: int = 8, progress=None) -> Perplexity:
    """Perplexity of each sequence, windows of every sequence batched together.

    `window` defaults to the model's context length (capped at 1024 to bound memory) and `stride`
    to half of it: a text longer than the window is scored window by window, each target once.
    """
    if window is None:
        ctx = getattr(getattr(_causal_lm(model), "config", None), "max_position_embeddings", None) or 1024
        window = min(int(ctx), 1024)
    stride = stride or max(1, window // 2)
    pieces = []  # (sample, begin, end, first_target)
    for i, x in enumerate(seqs):
        for begin, end, first in sliding_windows(len(x), window, stride):
            pieces.append((i, begin, end, first))
    sums = [0.0] * len(seqs)
    counts = [0] * len(seqs)
    # Similar lengths together: less padding.
    pieces.sort(key=lambda p: p[2] - p[1])
    for s in range(0, len(pieces), batch_size):
        chunk = pieces[s:s + batch_size]
        tf = teacher_forced(model, [seqs[i][b:e] for i, b, e, _ in chunk], pad_id)
        for row, (i, b, e, first) in enumerate(chunk):
            # target_logprobs[row, j] scores token b + j + 1
            lp = tf.target_logprobs[row, first - b - 1: e - b - 1].double()
            sums[i] -= float(lp.sum())
            counts[i] += int(lp.numel())
        if progress is not None:
            progress.update(len(chunk))
    return Perplexity([perplexity_from_nll(s, c) for s, c in zip(sums, counts)], sums, counts)


# ------------------------------------------------------------------------------ secret extraction

def secret_token_accuracy(generated: Sequence[int], secret: Sequence[int]) -> float:
    """Fraction of the secret's tokens that greedy decoding reproduced in place (0..1)."""
    if not secret:
        return 0.0
    return sum(int(g == s) for g, s in zip(generated, secret)) / len(secret)


def secret_in_text(generated_text: str, secret: str) -> bool:
    """Does the generated text contain the secret (whitespace-normalised, case-sensitive)?"""
    norm = " ".join(secret.split())
    return bool(norm) and norm in " ".join(generated_text.split())


def split_secret_tokens(tokenizer, prefix: str, secret: str) -> Tuple[torch.Tensor, List[int]]:
    """(prefix ids, secret ids) as the model sees them in prefix+secret.

    Tokenizing the two parts apart would give the secret a different first token (a BPE merge
    across the boundary, a missing leading-space marker); when the prefix's own tokens are not a
    prefix of the joint tokenization, the secret ids are those of the joint text after them anyway.
    """
    full = tokenizer(prefix + secret, add_special_tokens=True)["input_ids"]
    pre = tokenizer(prefix, add_special_tokens=True)["input_ids"]
    if full[: len(pre)] != pre:
        k = 0
        while k < min(len(pre), len(full)) and pre[k] == full[k]:
            k += 1
        pre = full[:k]
    return torch.tensor(pre, dtype=torch.long), full[len(pre):]


@torch.no_grad()
def secret_extraction(model, tokenizer, pairs: Sequence[Tuple[str, str]], slack_tokens: int = 8,
                      batch_size: int = 16, progress=None) -> List[Dict[str, float]]:
    """For each (prefix, secret): does greedy decoding from the prefix produce the secret?

    Generates len(secret tokens) + `slack_tokens` tokens. Returns per pair `extracted` (1.0 when
    the secret string appears in the decoded continuation, else 0.0) and `token_accuracy` (secret
    tokens reproduced in place). The decoded text is compared in memory and never returned.
    """
    prefixes, secrets_ids = [], []
    for prefix, secret in pairs:
        p, s = split_secret_tokens(tokenizer, prefix, secret)
        if len(p) == 0 or not s:
            raise ValueError("each prefix and secret must tokenize to at least one token")
        prefixes.append(p)
        secrets_ids.append(s)
    gens = greedy_continue(model, prefixes, [len(s) + slack_tokens for s in secrets_ids], tokenizer.pad_token_id,
                           batch_size=batch_size, progress=progress)
    out = []
    for (_, secret), g, s in zip(pairs, gens, secrets_ids):
        text = tokenizer.decode(g, skip_special_tokens=True)
        out.append({"extracted": float(secret_in_text(text, secret)), "token_accuracy": secret_token_accuracy(g, s)})
    return out
