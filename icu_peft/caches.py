"""Per-sample memos of frozen computations that every unlearning step would otherwise repeat.

`CachedReference`: the frozen reference model's final hidden states (the KL anchor).

`FrozenPrefixBackbone`: run only the decoder layers that train; remember what the frozen layers
below them produce.

With LoRA in the last N layers (`lora_layers`), the layers below never change during a forget
request, so the hidden state entering the first trained layer is a fixed function of the tokens.
Every step feeds the same forget, neighbour and retain samples again; on SmolLM2 with LoRA in the
last 10 of 30 layers, two thirds of each training forward pass recomputed that fixed state.
`FrozenPrefixBackbone` computes it once per sample (memoised by `CachedReference`, keyed by tokens)
and runs only the top layers on it.

How: the backbone's `layers` and `norm` are swapped for the slice that should run (and an identity
norm for the prefix), and the tail is called with `inputs_embeds=` the cached state. That relies on
the backbone's forward looping over `self.layers` and accepting `inputs_embeds` unchanged, which
holds for Llama-style models; `FrozenPrefixBackbone.build` checks it against a plain forward pass on
the model at hand and returns None (no caching) when the two differ.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
from torch import nn

logger = logging.getLogger("icu_peft")


class CachedReference:
    """Memoises a frozen reference's final hidden states per sequence.

    The reference (the base with the forget adapter switched off, or a frozen copy) never changes
    during a request, yet every step asks it about the same retain and forget samples again: on a
    CPU that forward pass is a third of a step. Rows are keyed by their tokens, so any batch made of
    already-seen samples is answered from memory. Only right-padded batches are cached (then a row's
    valid positions do not depend on its batch-mates); anything else goes straight to `fn`.
    """

    def __init__(self, fn, max_bytes: int):
        self.fn, self.max_bytes = fn, max_bytes
        self.store: dict = {}
        self.anchors: dict = {}  # (head, tokens) -> reference_anchor's (r, lse): the KL without the reference's logits
        self.bytes = 0
        self.hits = self.misses = 0

    @staticmethod
    def _right_padded(mask: torch.Tensor) -> bool:
        lengths = mask.sum(-1)
        pos = torch.arange(mask.shape[1], device=mask.device)
        return bool(((pos[None, :] < lengths[:, None]).to(mask.dtype) == mask).all())

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.max_bytes <= 0 or not self._right_padded(attention_mask):
            return self.fn(input_ids, attention_mask)
        lengths = attention_mask.sum(-1).tolist()
        keys = [input_ids[i, :n].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            width = max(lengths[i] for i in missing)
            h = self.fn(input_ids[missing, :width], attention_mask[missing, :width])
            for row, i in enumerate(missing):
                fresh[keys[i]] = h[row, : lengths[i]]
                if self.bytes + fresh[keys[i]].nbytes <= self.max_bytes and keys[i] not in self.store:
                    self.store[keys[i]] = fresh[keys[i]].detach().to("cpu", copy=True)
                    self.bytes += fresh[keys[i]].nbytes
        first = fresh[keys[0]] if keys[0] in fresh else self.store[keys[0]]
        out = first.new_zeros((len(keys), input_ids.shape[1], first.shape[-1]), device=input_ids.device)
        for i, k in enumerate(keys):
            out[i, : lengths[i]] = fresh[k] if k in fresh else self.store[k]
        return out

    def anchor(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, head,
               hidden: Optional[torch.Tensor] = None) -> Optional[tuple]:
        """(r, lse) of losses.reference_anchor for the reference's hidden states of this batch (padded like
        it, zeros at the pads), each row computed once and kept within the same memory budget as the hidden
        states; None where the head is not a plain linear map or the batch is not right-padded (the caller
        then takes the reference's logits). `hidden`: this batch's reference states, if already at hand."""
        from .losses import linear_head, reference_anchor

        if not linear_head(head) or not self._right_padded(attention_mask):
            return None
        if hidden is None:
            hidden = self(input_ids, attention_mask)
        lengths = attention_mask.sum(-1).tolist()
        keys = [(id(head), input_ids[i, :n].cpu().numpy().tobytes()) for i, n in enumerate(lengths)]
        # a row is only worth its anchor when kept: made afresh at each step it costs more than the logits
        width = hidden.shape[-1] + 1
        need = sum(4 * width * n for k, n in zip(keys, lengths) if k not in self.anchors)
        if need and self.bytes + need > self.max_bytes:
            return None
        r = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
        for i, (key, n) in enumerate(zip(keys, lengths)):
            # keyed by the head too: a precision view with its own head must not read another view's rows
            kept = self.anchors.get(key)
            if kept is None:
                kept = tuple(t.to("cpu", copy=True) for t in reference_anchor(head, hidden[i, :n]))
                self.anchors[key] = kept
                self.bytes += kept[0].nbytes + kept[1].nbytes
            r[i, :n], lse[i, :n] = kept[0].to(r.device), kept[1].to(r.device)
        return r, lse


def first_trained_layer(backbone) -> Optional[int]:
    """Index of the lowest decoder layer holding a trainable parameter; None when the embeddings train,
    when nothing trains, or when the backbone has no `layers` list."""
    layers = getattr(backbone, "layers", None)
    embed = getattr(backbone, "embed_tokens", None)
    if not isinstance(layers, nn.ModuleList) or embed is None:
        return None
    if any(p.requires_grad for p in embed.parameters()):
        return None
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return None


class FrozenPrefixBackbone:
    """Callable like the backbone (`input_ids=`, `attention_mask=`), running only layers[start:]."""

    def __init__(self, backbone, start: int, max_bytes: int):
        self.backbone, self.start = backbone, start
        self.prefix = CachedReference(self._prefix_hidden, max_bytes)

    @contextlib.contextmanager
    def _running(self, layers: nn.ModuleList, norm: nn.Module):
        full_layers, full_norm = self.backbone.layers, self.backbone.norm
        self.backbone.layers, self.backbone.norm = layers, norm
        try:
            yield
        finally:
            self.backbone.layers, self.backbone.norm = full_layers, full_norm

    @torch.no_grad()
    def _prefix_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with self._running(nn.ModuleList(self.backbone.layers[: self.start]), nn.Identity()):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        h = self.prefix(input_ids, attention_mask)
        with self._running(nn.ModuleList(self.backbone.layers[self.start:]), self.backbone.norm):
            return self.backbone(inputs_embeds=h, attention_mask=attention_mask)

    @classmethod
    def build(cls, backbone, max_bytes: int) -> Optional["FrozenPrefixBackbone"]:
        """A prefix-caching backbone if some lower layers are frozen and the split reproduces the plain
        forward pass on this model (checked on a short input); otherwise None."""
        if max_bytes <= 0:
            return None
        start = first_trained_layer(backbone)
        if not start:
            return None
        me = cls(backbone, start, max_bytes=0)  # the check must not fill the cache
        device = next(backbone.parameters()).device
        vocab = backbone.embed_tokens.num_embeddings
        ids = (torch.arange(2 * 7, device=device).view(2, 7) * 97 + 5) % vocab
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # right padding, as in training batches
        with torch.no_grad():
            want = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            got = me(ids, mask).last_hidden_state
        real = mask.bool()
        if not torch.allclose(want[real].float(), got[real].float(), atol=1e-4, rtol=1e-3):
            logger.info("frozen-prefix cache off: splitting this model's forward pass at layer %d changes its output",
                        start)
            return None
        me.prefix.max_bytes = max_bytes
        logger.info("frozen-prefix cache: decoder layers 0-%d run once per sample; steps run layers %d-%d",
                    start - 1, start, len(backbone.layers) - 1)
        return me


def stored_scores(key: Optional[dict], compute):
    """`compute()` (a metrics.Scores), remembered on disk under `key` (None: not remembered).

    For the never-seen text's scores under an untouched base: the EL_n roll-outs behind them are the
    costliest measurement of a request (minutes on a CPU), and the same base and never-seen set come
    back request after request. The key names the base by its weight files' hashes, the precision it
    was loaded in, the token ids scored and every setting the scores depend on; the file holds only
    numbers (never text), in the icu-peft cache directory. A file that does not parse is recomputed.
    """
    import hashlib
    import json

    from .atomicfile import atomic_write
    from .metrics import Scores
    from .models import cache_root

    if key is None:
        return compute()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    path = cache_root() / "scores" / f"{digest}.json"
    try:
        data = json.loads(path.read_text())
        return Scores(ma=data["ma"], el=data["el"], bleu=data.get("bleu"), nll=data.get("nll"))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scores = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"ma": scores.ma, "el": scores.el, "bleu": scores.bleu, "nll": scores.nll}))
    except OSError as e:  # a read-only cache costs time, not correctness
        logger.debug("score cache not written: %s", e)
    return scores
