"""The codebook bottleneck: math (pure functions), the module, and its attachment to a decoder layer
(its residual output, or the output of its MLP or self-attention sub-module: the "site").

Each hidden state h is ranked against every code vector (cosine or inner product); the top-k codes
are combined (mean or sum) and replace h. Masked codes are either blocked (ranked -inf, so the
next-best codes take their place) or zeroed (still chosen, but contribute a zero vector).

Attachment is a forward hook on the decoder layer (or its sub-module), not a replaced module, because:
- icu_peft.metrics and the ICU losses call the inner backbone directly (chunked logits) and
  `generate` runs the layer step by step with a KV cache: a hook on the layer sees every one of
  those paths, whatever wraps the model (PeftModel, LoRA forget adapters);
- the base model's module tree and state_dict stay untouched, so its fingerprint, PEFT target
  names and `save_pretrained` output are the same with or without the codebook;
- removing the hook restores the base exactly (the handle is all there is to undo).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import pad_batch
from ..errors import InputError
from ..metrics import model_device

# ------------------------------------------------------------------------------ pure functions


def code_scores(h: torch.Tensor, codebook: torch.Tensor, similarity: str = "cosine") -> torch.Tensor:
    """(..., num_codes) similarity of each hidden state to each code."""
    if similarity == "cosine":
        return F.normalize(h, dim=-1) @ F.normalize(codebook, dim=-1).T
    return h @ codebook.T


def topk_codes(scores: torch.Tensor, k: int, blocked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (..., k) of the k best codes; `blocked` (bool, num_codes) codes are never chosen."""
    if blocked is not None and bool(blocked.any()):
        scores = scores.masked_fill(blocked, float("-inf"))
    return scores.topk(k, dim=-1).indices


def combine_codes(codebook: torch.Tensor, idx: torch.Tensor, combine: str = "mean",
                  zeroed: Optional[torch.Tensor] = None, negated: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Combination of the chosen code vectors; `zeroed` (bool, num_codes) codes contribute zeros,
    `negated` ones their opposite."""
    vecs = F.embedding(idx, codebook)
    if zeroed is not None and bool(zeroed.any()):
        vecs = vecs * (~zeroed[idx]).unsqueeze(-1).to(vecs.dtype)
    if negated is not None and bool(negated.any()):
        vecs = vecs * (1 - 2 * negated[idx].to(vecs.dtype)).unsqueeze(-1)
    return vecs.mean(-2) if combine == "mean" else vecs.sum(-2)


def kmeans(x: torch.Tensor, n: int, iters: int = 20, similarity: str = "cosine", seed: int = 0) -> torch.Tensor:
    """Centroids (n, d) of the rows of x; with cosine similarity, assignment is by angle (spherical
    k-means) but centroids stay raw means so code vectors keep the hidden states' scale."""
    if x.shape[0] < n:
        raise InputError(f"k-means needs at least {n} hidden states, got {x.shape[0]} (give more training text)")
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centroids = x[torch.randperm(x.shape[0], generator=g)[:n]].clone()
    for _ in range(iters):
        assign = torch.cat([code_scores(part, centroids, similarity).argmax(-1) for part in x.split(8192)])
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n).float()
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any():  # an empty cluster restarts on a random point
            centroids[empty] = x[torch.randint(0, x.shape[0], (int(empty.sum()),), generator=g)]
    return centroids


# ------------------------------------------------------------------------------ the module


def massive_positions(h: torch.Tensor, ratio: float) -> Optional[torch.Tensor]:
    """Bool mask (h.shape[:-1]) of positions whose norm exceeds `ratio` x the median norm; None if ratio <= 0."""
    if ratio <= 0:
        return None
    norms = h.float().norm(dim=-1)
    return norms > ratio * norms.median()


class CodebookLayer(nn.Module):
    """A codebook of `num_codes` vectors of the model's hidden size; maps h -> combination of top-k codes.

    Not a submodule of the base model: it lives beside it and is called from a forward hook.
    """

    def __init__(self, num_codes: int, dim: int, k: int = 8, similarity: str = "cosine", combine: str = "mean"):
        super().__init__()
        self.k, self.similarity, self.combine = k, similarity, combine
        self.weight = nn.Parameter(torch.randn(num_codes, dim) * 0.02)
        self.register_buffer("blocked", torch.zeros(num_codes, dtype=torch.bool), persistent=False)
        self.register_buffer("zeroed", torch.zeros(num_codes, dtype=torch.bool), persistent=False)
        self.register_buffer("negated", torch.zeros(num_codes, dtype=torch.bool), persistent=False)
        self.enabled = True
        # Positions whose hidden-state norm exceeds this many times the median pass through untouched
        # (0: none). Attention-sink tokens carry norms ~150x the rest in SmolLM2; no combination of
        # unit-scale codes reproduces them, and snapping them wrecks every later position.
        self.passthrough_ratio = 0.0
        # Set by whoever needs them (training, activation counting); None costs nothing.
        self.record: Optional[List[torch.Tensor]] = None
        self.keep_last = False
        self.last: Optional[tuple] = None

    @property
    def num_codes(self) -> int:
        return self.weight.shape[0]

    def set_mask(self, codes, mode: str = "zero") -> None:
        """Mask `codes` (ids): 'zero', 'negate' or 'block'. An empty list is the identity (no mask)."""
        ids = torch.as_tensor(list(codes), dtype=torch.long, device=self.blocked.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise InputError(f"code ids must be in [0, {self.num_codes}); got {int(ids.min())}..{int(ids.max())}")
        if mode not in ("block", "zero", "negate"):
            raise InputError("mask mode must be 'block', 'zero' or 'negate'")
        self.blocked.zero_()
        self.zeroed.zero_()
        self.negated.zero_()
        target = {"block": self.blocked, "zero": self.zeroed, "negate": self.negated}[mode]
        target[ids] = True
        if int(self.blocked.sum()) > self.num_codes - self.k:
            raise InputError(f"cannot block {int(self.blocked.sum())} of {self.num_codes} codes with k={self.k}")

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cb = self.weight.to(h.dtype)
        with torch.no_grad():  # ranking is discrete: gradients reach the codes through the combination
            idx = topk_codes(code_scores(h.detach(), cb.detach(), self.similarity), self.k, self.blocked)
        q = combine_codes(cb, idx, self.combine, self.zeroed, self.negated)
        through = massive_positions(h.detach(), self.passthrough_ratio)
        if through is not None:
            q = torch.where(through.unsqueeze(-1), h.detach().to(q.dtype), q)
            idx = idx.masked_fill(through.unsqueeze(-1), -1)  # -1: no code (consumers skip it)
        if self.record is not None:
            self.record.append(idx.detach().cpu())
        if self.keep_last:
            self.last = (h, q, idx)
        # Straight-through: the forward value is q, the gradient w.r.t. h passes unchanged (it matters
        # only when something below the bottleneck trains, e.g. a LoRA adapter under the codebook).
        return q + (h - h.detach()) if h.requires_grad else q


# ------------------------------------------------------------------------------ attachment


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layer stack of a causal LM (Llama/Mistral/Qwen `model.layers`, GPT-2/Neo `transformer.h`, ...)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(causal.config, "num_hidden_layers", None)
    for name, mod in causal.named_modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n) and name.split(".")[-1] in ("layers", "h", "blocks"):
            return mod
    raise InputError(f"cannot find the decoder layers of {type(causal).__name__}")


def resolve_layer(model, layer: Optional[int]) -> int:
    """0-based index of the bottleneck layer; None is a tenth of the way up, negatives count from the end.

    Why early by default: there a name's tokens still carry it at their own positions, so masking
    their codes hides it from every layer above; by the middle layers the model has already copied
    it to the positions that use it (docs/CHANGELOG.md, "CodeUnlearn vs ICU").
    """
    n = len(decoder_layers(model))
    i = n // 10 if layer is None else layer
    i = i + n if i < 0 else i
    if not 0 <= i < n:
        raise InputError(f"layer {layer} is out of range: the model has {n} decoder layers")
    return i


def resolve_layers(model, layer: Optional[int], layers: Optional[List[int]] = None) -> List[int]:
    """0-based indices of the bottleneck layers, ascending: `layers` when given (each resolved as in
    resolve_layer), else the one `layer`. Repeats are refused (two stages on one site would snap twice)."""
    if not layers:
        return [resolve_layer(model, layer)]
    out = [resolve_layer(model, i) for i in layers]
    if len(set(out)) != len(out):
        raise InputError(f"layers {layers} name the same decoder layer twice")
    return sorted(out)


# Names of the sub-modules a site may be, per architecture family (Llama/Mistral/Qwen: mlp, self_attn;
# GPT-2/Neo: mlp, attn; some others: feed_forward, attention). The first one present wins.
SITES = {"residual": (), "mlp": ("mlp", "feed_forward"), "attention": ("self_attn", "attn", "attention")}


def site_module(model, layer_index: int, site: str = "residual") -> nn.Module:
    """The module whose output the bottleneck replaces: decoder layer `layer_index` itself ("residual"),
    or its MLP ("mlp") or self-attention ("attention") sub-module."""
    if site not in SITES:
        raise InputError(f"unknown codebook site {site!r}: choose one of {', '.join(SITES)}")
    layer = decoder_layers(model)[layer_index]
    if site == "residual":
        return layer
    for name in SITES[site]:
        mod = getattr(layer, name, None)
        if isinstance(mod, nn.Module):
            return mod
    raise InputError(f"decoder layer {layer_index} ({type(layer).__name__}) has no {site} sub-module "
                     f"(looked for: {', '.join(SITES[site])})")


def _replace_hidden(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    # Decoder layers return a tensor (transformers >= 4.54) or a tuple whose first item is the residual;
    # attention modules return (output, weights, ...) and MLPs a tensor.
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    raise TypeError(f"unexpected {type(output).__name__} output at the codebook site")


def attach(model, codebook: nn.Module, layer_index: int, site: str = "residual"):
    """Snap the output of the `site` of decoder layer `layer_index` through `codebook` (a CodebookLayer, or
    an SAELayer, which subtracts its masked features); returns the hook handle.

    At "mlp" or "attention" only that sub-layer's contribution is quantized: the layer adds it to the
    residual stream itself, so everything else in the stream passes the bottleneck untouched.
    """
    module = site_module(model, layer_index, site)
    device = next(decoder_layers(model)[layer_index].parameters()).device
    codebook.to(device)

    def hook(module, args, output):
        if not codebook.enabled:
            return output
        return _replace_hidden(output, codebook)

    return module.register_forward_hook(hook)


def capture(model, layer_index: int, sink: List[torch.Tensor], site: str = "residual"):
    """Record (without changing) the output of a site of a decoder layer; returns the hook handle."""
    module = site_module(model, layer_index, site)

    def hook(module, args, output):
        _replace_hidden(output, lambda h: sink.append(h.detach()) or h)

    return module.register_forward_hook(hook)


@torch.no_grad()
def count_code_activations(model, layers: Sequence[nn.Module], seqs: Sequence[torch.Tensor], pad_id: int,
                           batch_size: int = 8, only: Optional[Sequence[Sequence[int]]] = None) -> Tuple[torch.Tensor, int]:
    """(per-code count of real positions where the code is in the top-k, number of positions counted), with
    the stages `layers` attached to `model`.

    Codes are global over the stages (a multi-layer codebook's stage i adds i * num_codes); a position
    counts once per stage. `only[i]`: the positions of sequence i to count (default: every real one).
    """
    device = model_device(model)
    n = layers[0].num_codes  # every stage holds the same number
    counts = torch.zeros(n * len(layers), dtype=torch.long)
    positions = 0
    for layer in layers:
        layer.record = []
    try:
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[s:s + batch_size], pad_id)
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            valid = mask.bool()
            if only is not None:
                valid = torch.zeros_like(valid)
                for row, pos in enumerate(only[s:s + batch_size]):
                    if len(pos):
                        valid[row, torch.as_tensor(list(pos), dtype=torch.long)] = True
            for stage, layer in enumerate(layers):
                idx = layer.record.pop()
                codes = idx[valid].reshape(-1)
                counts[stage * n:(stage + 1) * n] += torch.bincount(codes[codes >= 0], minlength=n)  # -1: passed through
            positions += int(valid.sum())
    finally:
        for layer in layers:
            layer.record = None
    return counts, positions
