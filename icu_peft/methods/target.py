"""Calibrated forgetting, icu-peft's default: distil each forget sample towards a target that looks
like text the model never saw.

ICU's structure stays (a forget term on the forget samples, NLL + KL to the reference on their
neighbours, per-sample refinement), but the forget term is bounded and aimed: before training,
`calibrate.token_targets` gives every next token of every forget sample a target probability
(rank-matched to the never-seen text's per-token losses, shifted per sample until its mean NLL sits
at the middle of the never-seen band and its MA inside it). The loss is a per-token binary
cross-entropy between the true token's probability and its target. Its minimum is the target, so it
cannot push a sample past the band the way gradient ascent does; tokens the base already finds hard
have their own probability as target, so the same term holds them in place. Only the true token's
probability is constrained: matching the reference's whole residual distribution (a KL to a
relabelled reference, as UNDIAL does) left a 0.6-nat floor on a tiny memoriser, its residual being noise.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from ..calibrate import sorted_order, token_targets
from ..losses import chunked_target_bce
from .base import ForgetBatch, Method, PrepareContext, UnseenNow

logger = logging.getLogger("icu_peft")


def prepare_targets(ctx: PrepareContext, config):
    """Per-sample target log-probs (calibrate.TokenTargets) from the base's per-token statistics."""
    if ctx.band is None or ctx.unseen_token_nll is None:
        # No never-seen text: no loss level to match. Keep each token's rank-free target at the MA
        # threshold only, i.e. match the forget set's own harder tokens (a weaker, documented fallback).
        logger.warning("method icu without never-seen text (--unseen): targets only bring MA under its threshold; "
                       "the loss level cannot be matched, so membership inference is not calibrated")
        pooled = torch.cat([x for x in ctx.ref_nll if x.numel()]) if ctx.ref_nll else torch.zeros(1)
        goal, cap, unseen = 0.0, None, pooled
    else:
        goal, cap, unseen = ctx.band.nll_mid, ctx.band.inner_hi, ctx.unseen_token_nll
    weights = [w[1:] if w is not None else None for w in ctx.weights] if ctx.weights else None
    shared = ctx.shared if config.rank_by_sharing else None
    state = token_targets(ctx.ref_nll, ctx.ref_other, unseen, goal, ctx.ma_max, weights, nll_cap=cap, shared=shared)
    if ctx.band is not None and ctx.unseen_token_nll is not None:
        # the same targets, matched again to the never-seen text as the trained model has it (follow_unseen)
        state.remake = partial(token_targets, ctx.ref_nll, ctx.ref_other, ma_max=ctx.ma_max, weights=weights,
                               shared=shared)
    if ctx.ref_entropy is not None and ctx.unseen_token_entropy is not None and ctx.unseen_token_nll is not None:
        state.with_entropy(ctx.ref_entropy, ctx.unseen_token_nll, ctx.unseen_token_entropy)
    return state


def _aligned(batch: ForgetBatch, per_sample) -> torch.Tensor:
    """(B, T) on the batch's device: each row's per-next-token values (T-1,) aligned with the labels, so
    position t holds the value for token t (position 0, which no token predicts, and padding hold 0)."""
    out = torch.zeros((len(batch.rows), batch.ids.shape[1]), dtype=torch.float32)
    for r, i in enumerate(batch.rows):
        out[r, 1:1 + per_sample[i].numel()] = per_sample[i]
    return out.to(batch.hidden.device)


def target_forget_loss(batch: ForgetBatch, config) -> torch.Tensor:
    """Mean per-token binary cross-entropy of the true token's probability against its target."""
    t = _aligned(batch, batch.state.logp)
    ent = _aligned(batch, batch.state.entropy) if config.entropy_weight and batch.state.entropy else None
    # the log-space pull back only where a sample went too far: all tokens of a sample past the band, the tail
    # of one whose tail the loop made easier (TokenTargets.pull_tokens). On every token of every sample it
    # held tokens to their own targets where the mean was what mattered (the matrix's code request ended
    # partial, 5/6)
    pulled = {i: batch.state.pull_tokens(i) for i in batch.rows}
    pull = None
    if config.target_pull_weight and any(v is not None for v in pulled.values()):
        logp = batch.state.logp
        pull = config.target_pull_weight * _aligned(
            batch, {i: torch.zeros_like(logp[i]) if pulled[i] is None else pulled[i] for i in batch.rows})
    s, c = chunked_target_bce(batch.hidden, batch.head, batch.ids, batch.mask, t, batch.chunk_size, config.target_log_weight,
                              ent, config.entropy_weight, pull)
    return s / c.clamp(min=1)


def follow_unseen(state, now: UnseenNow, config) -> None:
    """Re-aim the targets at the never-seen text as the trained model has it now.

    The loss targets were rank-matched to the never-seen tokens' losses under the base and shifted to
    the band's middle; the adapter moves text of the request's kind too (on a fresh Llama memoriser it
    lowered never-seen records by 0.4 nats in the 4-bit view it trained in). With `follow_unseen_loss`
    (off by default: it left the hardest tokens further from never-seen text's than the loop's centring
    does, docs/BENCHMARKS.md) the ranks, the shift and the cap are matched again each scoring; the moves
    the loop made since (retarget, recentre) stay. The entropy targets always follow the same pass
    (TokenTargets.follow_unseen)."""
    if config.follow_unseen_loss and state.remake is not None:
        state.rematch(state.remake(now.token_nll, nll_goal=now.goal, nll_cap=now.cap))
        if now.token_entropy is not None and state.unseen_order is not None:
            state.unseen_order = sorted_order(now.token_nll, now.token_entropy)
    if now.token_entropy is not None and config.entropy_weight:
        state.follow_unseen(now.token_entropy)


ICU = Method("icu", "calibrated ICU (default): distil each forget sample towards never-seen-looking targets, "
                    "CLE neighbours, per-sample refinement inside the never-seen band",
             dict(forget_loss="target"), target_forget_loss, prepare=prepare_targets,
             retarget=lambda state, i, delta, limit: state.move(i, delta, limit),
             follow_unseen=follow_unseen, reshape=lambda state, tilt: state.reshape(tilt),
             mark_past=lambda state, past: state.mark_past(past),
             retarget_tail=lambda state, i, delta, limit: state.move_tail(i, delta, limit),
             retarget_tail_entropy=lambda state, i, delta, limit: state.move_tail_entropy(i, delta, limit))
