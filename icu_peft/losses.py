"""The ICU loss terms as pure functions.

Two forms of each: on logits (what tests call on hand-made tensors) and on final hidden states plus
the output head, chunked over positions so that a (batch, length, vocab) logits tensor never exists
at once. At 135M parameters and a 49k vocabulary the logits, not the weights, dominate memory.

Conventions: `labels[b, t]` is the token at position t; the prediction for it comes from position
t-1, so every function shifts internally. `mask[b, t] = 1` marks real tokens (0 = padding).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .lowp import checkpoint_contexts


def _shift(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    """Align position t's prediction with token t+1; a target counts if both ends are real tokens."""
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return logits[:, :-1], labels[:, 1:], valid


def _target_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of each target, shaped like `targets` (logits already aligned with them)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           reduction="none").view(targets.shape)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood over real (unpadded) targets."""
    lg, lb, valid = _shift(logits, labels, mask)
    nll = _target_nll(lg, lb)
    return (nll * valid).sum() / valid.sum().clamp(min=1)


def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sample, shape (batch,)."""
    lg, lb, valid = _shift(logits, labels, mask)
    nll = _target_nll(lg, lb)
    return (nll * valid).sum(1) / valid.sum(1).clamp(min=1)


def kl_to_reference(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real positions of KL(p_ref || p_model) of the next-token distributions.

    ICU's code minimises the cross-entropy H(p_ref, p_model) = KL + H(p_ref); the gradient is the
    same, and KL reads better (0 = model behaves like the reference).
    """
    # Same positions as the NLL: every position whose next token is a real token.
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    ref_logits, logits = ref_logits[:, :-1], logits[:, :-1]
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    return (kl * valid).sum() / valid.sum().clamp(min=1)


def npo_loss(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation (Zhang et al. 2024) on sequence log-likelihoods, shape (batch,).

    (2/beta) * log(1 + (p/p_ref)^beta): like gradient ascent while p ~ p_ref, but its gradient
    fades as p falls below p_ref, so it does not run away.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - ref_logp)).mean()


def icu_loss(l_fgt: torch.Tensor, l_lrn: torch.Tensor, l_kl: torch.Tensor, u: float, a: float, b: float) -> torch.Tensor:
    """ICU's objective: ascend on the forget NLL, descend on the neighbours' NLL and KL."""
    return -u * l_fgt + a * l_lrn + b * l_kl


# ---------------------------------------------------------------------------------------------
# Chunked forms: hidden states (batch, length, dim) + head (a module mapping dim -> vocab).
# Each chunk's logits are recomputed in backward (activation checkpointing), so peak memory holds
# one chunk of logits instead of all of them.
# ---------------------------------------------------------------------------------------------

def ngram_set(seqs: Sequence[Sequence[int]], n: int) -> Set[Tuple[int, ...]]:
    """Every token n-gram of `seqs`, plus each sequence's shorter leading grams (its first n-1 tokens)."""
    out: Set[Tuple[int, ...]] = set()
    for x in seqs:
        x = [int(t) for t in x]
        for t in range(len(x)):
            out.add(tuple(x[max(0, t - n + 1):t + 1]))
    return out


def shared_context(ids: Sequence[int], pool: Sequence[Set[Tuple[int, ...]]]) -> torch.Tensor:
    """Per target position t (1..T-1): the longest n <= len(pool) whose n-gram ending at token t occurs in
    the pool, where pool[n-1] = ngram_set(pool text, n); 0 for a token the pool never has.

    How much of a token is shared with text that is not being forgotten: the "mg of" of a prescription
    (4: template), a first name other records carry too (1-2), the digits of its insurance id (0).
    """
    x = [int(t) for t in ids]
    out = []
    for t in range(1, len(x)):
        k = 0
        while k < len(pool) and t - k >= 0 and tuple(x[t - k:t + 1]) in pool[k]:
            k += 1
        out.append(k)
    return torch.tensor(out, dtype=torch.float32)


def distinct_token_mask(ids: Sequence[int], shared: Set[Tuple[int, ...]], n: int) -> torch.Tensor:
    """1.0 at each target position whose n-gram (the token and the n-1 before it) is not in `shared`.

    Position 0 has no target and gets 0. Forgetting aims at what is private to a sample, not at the
    template it shares with text that must stay (the "Email:" of a customer record): pushing those
    shared tokens down is exactly what damages the retained records.
    """
    x = [int(t) for t in ids]
    return torch.tensor([0.0] + [0.0 if tuple(x[max(0, t - n + 1):t + 1]) in shared else 1.0
                                 for t in range(1, len(x))])


def _nll_chunk(head: Callable, h: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return (_target_nll(head(h), targets) * valid).sum()


@torch.no_grad()
def _still_predicted(head: Callable, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (head(h).argmax(-1) == targets).float()


def _kl_chunk(head: Callable, h: torch.Tensor, ref_h: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(head(h).float(), dim=-1)
    with torch.no_grad():
        ref_lp = F.log_softmax(head(ref_h).float(), dim=-1)
    kl = (ref_lp.exp() * (ref_lp - lp)).sum(-1)
    return (kl * valid).sum()


class _EagerChunk(torch.autograd.Function):
    """A chunk's scalar loss whose gradient with respect to the hidden states (the first tensor) is taken
    in the forward pass itself, while the chunk's logits are alive; backward only scales it.

    Checkpointing a chunk (the fallback) runs the vocabulary-wide work three times: the forward, its
    recomputation in backward, and the backward. Here it runs twice (forward and backward, once each),
    and the peak memory is the same: one chunk's logits and their gradient, freed before the next chunk.
    Valid only when nothing but the hidden states needs a gradient from the chunk (a frozen head,
    `_frozen`); the rest of the arguments (reference states, targets, weights) carry none."""

    @staticmethod
    def forward(ctx, fn, hidden, *rest):
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_(True)
            value = fn(leaf, *rest)
            (grad,) = torch.autograd.grad(value, leaf, allow_unused=True)
        ctx.save_for_backward(torch.zeros_like(hidden) if grad is None else grad)
        ctx.rest = len(rest)
        return value.detach()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return (None, grad * upstream.to(grad.dtype)) + (None,) * ctx.rest


def _frozen(head) -> bool:
    """Whether `head` is a module none of whose parameters train (then a chunk's only gradient is the
    hidden states'); any other callable may hide trainable tensors and takes the checkpointed path."""
    return isinstance(head, torch.nn.Module) and not any(p.requires_grad for p in head.parameters())


def _run_chunk(fn, *args, grad: bool, head=None):
    if grad and _frozen(head):
        return _EagerChunk.apply(fn, *args)
    if grad:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=checkpoint_contexts)
    return fn(*args)


def _chunked_sum(fn: Callable, tensors: Sequence[torch.Tensor], chunk_size: int, grad: bool,
                 total: torch.Tensor, head=None) -> torch.Tensor:
    """`total` plus fn(*chunk) over chunks of the time axis (dim 1, sliced alike in every tensor); with
    `grad` each chunk's gradient is taken at once (a frozen `head`, _EagerChunk: fn must return a scalar and
    the first tensor must be the hidden states) or the chunk is checkpointed, so only one chunk's
    vocabulary-sized logits are alive at a time."""
    for s in range(0, tensors[0].shape[1], chunk_size):
        total = total + _run_chunk(fn, *(t[:, s:s + chunk_size] for t in tensors), grad=grad, head=head)
    return total


def chunked_token_nll(hidden: torch.Tensor, head: Callable, labels: torch.Tensor, mask: torch.Tensor,
                      chunk_size: int = 64, only_predicted: bool = False,
                      weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of next-token NLL over real targets, computed chunk by chunk.

    only_predicted: count only targets the model still predicts (argmax == target), the tokens that
    make up MA and EL. Gradient ascent then stops pushing a token once it is no longer produced,
    instead of driving it to ever lower probability (which is what spreads damage to similar text).
    weights: (B, T) per-token weights aligned with `labels` (e.g. distinct_token_mask); 0 drops a token.
    Returns (sum, count) so callers can combine several batches into one mean.
    """
    h, targets, valid = _shift(hidden, labels, mask)
    valid = valid.to(torch.float32)
    if weights is not None:
        valid = valid * weights[:, 1:].to(valid)
    total = hidden.new_zeros((), dtype=torch.float32)
    count = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    for s in range(0, h.shape[1], chunk_size):
        e = s + chunk_size
        v = valid[:, s:e]
        if only_predicted:
            v = v * _still_predicted(head, h[:, s:e].detach(), targets[:, s:e])
        total = total + _run_chunk(lambda a, b, c: _nll_chunk(head, a, b, c), h[:, s:e], targets[:, s:e], v, grad=grad,
                                   head=head)
        count = count + v.sum()
    return total, count


def chunked_kl_to_reference(hidden: torch.Tensor, ref_hidden: torch.Tensor, head: Callable, mask: torch.Tensor,
                            chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of KL(p_ref || p_model) over positions whose next token is real."""
    hidden, ref_hidden = hidden[:, :-1], ref_hidden[:, :-1]
    valid = (mask[:, 1:] * mask[:, :-1]).to(torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    total = _chunked_sum(lambda a, b, c: _kl_chunk(head, a, b, c), (hidden, ref_hidden, valid), chunk_size, grad,
                         hidden.new_zeros((), dtype=torch.float32), head)
    return total, valid.sum()


def _retain_chunk(head: Callable, h: torch.Tensor, ref_h: Optional[torch.Tensor], targets: torch.Tensor,
                  valid: torch.Tensor, nll_weight: float, kl_weight: float, parts: list) -> torch.Tensor:
    lp = F.log_softmax(head(h).float(), dim=-1)
    nll = -(lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * valid).sum() if nll_weight else lp.new_zeros(())
    kl = lp.new_zeros(())
    if kl_weight and ref_h is not None:
        with torch.no_grad():
            ref_lp = F.log_softmax(head(ref_h).float(), dim=-1)
        kl = ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * valid).sum()
    parts.append((nll.detach(), kl.detach()))
    return nll_weight * nll + kl_weight * kl


def linear_head(head) -> bool:
    """Whether `head` is a plain linear map of the hidden states (logits = W h + b): then the KL to a fixed
    reference can be taken from a few numbers per position kept from the reference (reference_anchor)."""
    return type(head) is torch.nn.Linear


@torch.no_grad()
def reference_anchor(head: torch.nn.Linear, ref_hidden: torch.Tensor,
                     chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r, lse) of a frozen reference at each position of `ref_hidden` (..., T, H): r = W^T p_ref (..., T, H),
    the reference's next-token distribution pulled back through the head, and lse = logsumexp(W h_ref + b)
    (..., T), computed as the current function mode computes the head (a training step's bf16 products).

    With a linear head, z - z_ref = W (h - h_ref), so KL(p_ref || p) = sum_v p_ref (z_ref - lse_ref - z + lse)
    = lse(z) - lse_ref - r . (h - h_ref): the reference's vocabulary-sized logits are needed once per sample,
    not at every step (_anchored_retain_chunk)."""
    r = torch.empty(ref_hidden.shape, dtype=torch.float32, device=ref_hidden.device)
    lse = torch.empty(ref_hidden.shape[:-1], dtype=torch.float32, device=ref_hidden.device)
    w = head.weight.float()
    for s in range(0, ref_hidden.shape[-2], chunk_size):
        z = head(ref_hidden[..., s:s + chunk_size, :]).float()
        lse[..., s:s + chunk_size] = torch.logsumexp(z, -1)
        r[..., s:s + chunk_size, :] = torch.softmax(z, -1) @ w
    return r, lse


def _anchored_retain_chunk(head: Callable, h: torch.Tensor, ref_h: torch.Tensor, r: torch.Tensor, lse_ref: torch.Tensor,
                           targets: torch.Tensor, valid: torch.Tensor, nll_weight: float, kl_weight: float,
                           parts: list) -> torch.Tensor:
    """_retain_chunk with the reference given by its anchor (reference_anchor): one vocabulary-wide product
    and one logsumexp per chunk instead of two products, two log-softmaxes and the KL's own pass over the
    vocabulary (on SmolLM2's 49k-token head two thirds of a retain chunk's forward work)."""
    z = head(h).float()
    lse = torch.logsumexp(z, -1)
    zero = lse.new_zeros(())
    nll = ((lse - z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)) * valid).sum() if nll_weight else zero
    kl = ((lse - lse_ref - ((h.float() - ref_h.float()) * r).sum(-1)) * valid).sum() if kl_weight else zero
    # at the reference itself the three terms cancel to rounding (a logged KL of -0.0005): the log says 0
    parts.append((nll.detach(), kl.detach().clamp(min=0)))
    return nll_weight * nll + kl_weight * kl


def chunked_retain_terms(hidden: torch.Tensor, ref_hidden: Optional[torch.Tensor], head: Callable, labels: torch.Tensor,
                         mask: torch.Tensor, nll_weight: float, kl_weight: float,
                         chunk_size: int = 64, ref_anchor: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ICU's two retain terms in one pass over the vocabulary: (nll_weight * NLL + kl_weight * KL(p_ref ||
    p_model), with grad; the NLL sum; the KL sum; both detached), summed over positions whose next token is
    real. The same numbers as chunked_token_nll and chunked_kl_to_reference, for one log-softmax per chunk
    instead of two (on SmolLM2's 49k-token head the retain terms were most of a training step).
    `ref_anchor`: (r, lse) of reference_anchor for `ref_hidden`'s positions (a linear head): the KL from
    them, without the reference's logits."""
    h, targets, valid = _shift(hidden, labels, mask)
    ref_h, valid = (ref_hidden[:, :-1] if ref_hidden is not None else None), valid.to(torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts: list = []
    n = -(-h.shape[1] // chunk_size) if h.shape[1] else 0
    if ref_h is None:
        fn = lambda a, b, c: _retain_chunk(head, a, None, b, c, nll_weight, kl_weight, parts)  # noqa: E731
        tensors = (h, targets, valid)
    elif ref_anchor is not None:
        fn = lambda a, rh, r, ls, b, c: _anchored_retain_chunk(head, a, rh, r, ls, b, c, nll_weight, kl_weight,  # noqa: E731
                                                               parts)
        tensors = (h, ref_h, ref_anchor[0][:, :-1], ref_anchor[1][:, :-1], targets, valid)
    else:
        fn = lambda a, r, b, c: _retain_chunk(head, a, r, b, c, nll_weight, kl_weight, parts)  # noqa: E731
        tensors = (h, ref_h, targets, valid)
    total = _chunked_sum(fn, tensors, chunk_size, grad, hidden.new_zeros((), dtype=torch.float32), head)
    # a checkpointed chunk runs fn again in backward and appends again: the first n entries are the forward's
    first = parts[:n]
    zero = hidden.new_zeros((), dtype=torch.float32)
    return total, sum((x for x, _ in first), zero), sum((y for _, y in first), zero)


def chunked_sequence_logprob(hidden: torch.Tensor, head: Callable, labels: torch.Tensor, mask: torch.Tensor,
                             chunk_size: int = 64) -> torch.Tensor:
    """Per-sample sum of next-token log-probabilities over real targets, shape (batch,)."""
    h, targets, valid = _shift(hidden, labels, mask)
    valid = valid.to(torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad

    def per_sample(a, b, c):
        return -(_target_nll(head(a), b) * c).sum(1)

    return _chunked_sum(per_sample, (h, targets, valid), chunk_size, grad,
                        hidden.new_zeros((hidden.shape[0],), dtype=torch.float32))


def simnpo_loss(logp: torch.Tensor, lengths: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): NPO without a reference, on the length-normalised log-likelihood.

    (2/beta) * log(1 + exp(beta * logp/|y| + gamma)); minimised. `logp`: (batch,) summed token
    log-probabilities, `lengths`: (batch,) their target counts.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * logp / lengths.clamp(min=1) - gamma).mean()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def relabelled_log_probs(ref_logp: torch.Tensor, targets: torch.Tensor, new_target_logp: torch.Tensor) -> torch.Tensor:
    """The reference's next-token log-distribution with the target token's log-prob set to `new_target_logp`.

    The other tokens keep their proportions and share what the target token gave up. `ref_logp`:
    (..., V) log-probs, `targets`: (...) token ids, `new_target_logp`: (...) values <= 0.
    """
    ref_y = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    others = ref_logp.scatter(-1, targets.unsqueeze(-1), float("-inf"))
    # log(mass of the others) from the others themselves: 1 - p_y loses every digit when p_y ~ 1
    scale = log1mexp(new_target_logp) - torch.logsumexp(others, dim=-1)
    scale = torch.where(new_target_logp >= ref_y, torch.zeros_like(scale), scale)
    out = ref_logp + scale.unsqueeze(-1)
    return out.scatter(-1, targets.unsqueeze(-1), torch.minimum(new_target_logp, ref_y).unsqueeze(-1))


def _relabel_kl_chunk(head: Callable, h: torch.Tensor, ref_h: torch.Tensor, targets: torch.Tensor,
                      new_logp: Callable, valid: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(head(h).float(), dim=-1)
    with torch.no_grad():
        ref_lp = F.log_softmax(head(ref_h).float(), dim=-1)
        ref_y = ref_lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lq = relabelled_log_probs(ref_lp, targets, new_logp(ref_y))
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return (kl * valid).sum()


def chunked_relabelled_kl(hidden: torch.Tensor, ref_hidden: torch.Tensor, head: Callable, labels: torch.Tensor,
                          mask: torch.Tensor, new_logp: Callable, chunk_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of KL(q || p_model) over real targets, q = the reference with the true next
    token's log-prob replaced by new_logp(ref log-prob) (see relabelled_log_probs).

    Self-distillation towards a lowered target: bounded by construction (its minimum is the target
    distribution, so the forget term cannot run away as gradient ascent does).
    """
    h, targets, valid = _shift(hidden, labels, mask)
    ref_h, valid = ref_hidden[:, :-1], valid.to(torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    total = _chunked_sum(lambda a, b, c, d: _relabel_kl_chunk(head, a, b, c, new_logp, d), (h, ref_h, targets, valid),
                         chunk_size, grad, hidden.new_zeros((), dtype=torch.float32), head)
    return total, valid.sum()


def target_token_bce(logp: torch.Tensor, target_logp: torch.Tensor, log_weight: float = 0.0,
                     pull_weight=0.0) -> torch.Tensor:
    """Binary cross-entropy between the target token's probability and its target, per position.

    -[p* log p + (1 - p*) log(1 - p)] with p = exp(logp), p* = exp(target_logp): minimal at p = p*,
    so it is bounded by construction, and it constrains only the true token's probability (the rest
    of the distribution is left to the model and the retain anchors, rather than forced to the
    shape of the reference's residual). Both arguments are log-probabilities (<= 0).
    """
    p_star = target_logp.exp()
    # The BCE's pull fades as p shrinks (its gradient is p - p*), so a token meant to be very unlikely
    # (an unseen text's hardest tokens are) stops a few nats short and the sample's NLL plateaus
    # under the band. A one-sided Huber term on how far log p is still above log p* keeps pushing
    # such tokens; `log_weight` keeps it from drowning the retain anchors (at weight 1 it did: retain
    # MA fell below 90% within 12 steps on two tiny memorisers, docs/METHOD.md).
    # The same fading works the other way: a token pushed past its target (less likely than p*) is pulled
    # back by p* - p only, next to nothing for a target of a few nats. `pull_weight` is the same Huber term
    # on how far log p has fallen under log p*: without it a warm-started ledger consolidation on SmolLM2
    # left both records 0.2-0.3 nats past the never-seen band for 140 steps while the BCE went on falling.
    bce = -(p_star * logp + (1 - p_star) * log1mexp(logp))
    gap = logp - target_logp
    if log_weight:
        bce = bce + log_weight * _huber(gap.clamp(min=0))
    if isinstance(pull_weight, torch.Tensor) or pull_weight:  # a number, or a tensor shaped like logp
        bce = bce + pull_weight * _huber((-gap).clamp(min=0))
    return bce


def _huber(x: torch.Tensor) -> torch.Tensor:
    """Huber of a non-negative gap (nats): quadratic under 1, linear beyond."""
    return torch.where(x < 1, 0.5 * x ** 2, x - 0.5)


def entropy_error(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per position, the squared gap (nats^2) between the next-token entropy of log-probs `logp` (..., V)
    and its `target` (...). Two-sided: minimal at the target, so a heavier weight converges faster
    rather than pushing past it (a one-sided cap at the never-seen mean did: docs/BENCHMARKS.md)."""
    return (-(logp.exp() * logp).sum(-1) - target) ** 2


def _target_bce_chunk(head: Callable, h: torch.Tensor, targets: torch.Tensor, target_logp: torch.Tensor,
                      valid: torch.Tensor, log_weight: float, target_entropy: Optional[torch.Tensor] = None,
                      entropy_weight: float = 0.0, pull_weight=0.0) -> torch.Tensor:
    full = F.log_softmax(head(h).float(), dim=-1)
    lp = full.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    loss = target_token_bce(lp, target_logp, log_weight, pull_weight)
    if entropy_weight and target_entropy is not None:
        loss = loss + entropy_weight * entropy_error(full, target_entropy)
    return (loss * valid).sum()


def chunked_target_bce(hidden: torch.Tensor, head: Callable, labels: torch.Tensor, mask: torch.Tensor,
                       target_logp: torch.Tensor, chunk_size: int = 64, log_weight: float = 0.0,
                       target_entropy: Optional[torch.Tensor] = None, entropy_weight: float = 0.0,
                       pull_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of target_token_bce over real targets; `target_logp` (B, T) is aligned with `labels`.
    With `entropy_weight` and `target_entropy` (B, T, aligned the same way), each position also pays
    that weight times entropy_error against its target entropy. `pull_weight` (B, T, aligned the same
    way; None: 0): target_token_bce's pull_weight per position."""
    h, targets, valid = _shift(hidden, labels, mask)
    tl, valid = target_logp[:, 1:], valid.to(torch.float32)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    pull = torch.zeros_like(tl) if pull_weight is None else pull_weight[:, 1:].to(tl)
    if entropy_weight and target_entropy is not None:
        te = target_entropy[:, 1:]
        fn = lambda a, b, c, p, e, d: _target_bce_chunk(head, a, b, c, d, log_weight, e, entropy_weight, p)  # noqa: E731
        tensors = (h, targets, tl, pull, te, valid)
    else:
        fn = lambda a, b, c, p, d: _target_bce_chunk(head, a, b, c, d, log_weight, pull_weight=p)  # noqa: E731
        tensors = (h, targets, tl, pull, valid)
    total = _chunked_sum(fn, tensors, chunk_size, grad, hidden.new_zeros((), dtype=torch.float32), head)
    return total, valid.sum()
