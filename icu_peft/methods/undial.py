"""UNDIAL (Dong et al. 2024): self-distillation towards the reference with the true token's logit lowered.

The student is pulled towards softmax(ref_logits - gamma * onehot(next token)): bounded by
construction (its optimum is that distribution), but with one gamma for every token, so already
unlikely tokens are pushed further down as much as memorised ones.
"""

from __future__ import annotations

import torch

from ..losses import chunked_relabelled_kl, log1mexp
from .base import ForgetBatch, Method


def lowered_logit_logp(ref_y: torch.Tensor, gamma: float) -> torch.Tensor:
    """log-prob of the true token after its logit is lowered by gamma: the softmax renormalises."""
    # p' = p e^-g / (p e^-g + 1 - p)  ->  log p' = log p - g - log(p e^-g + 1 - p)
    return ref_y - gamma - torch.logaddexp(ref_y - gamma, log1mexp(ref_y))


def undial_forget_loss(batch: ForgetBatch, config) -> torch.Tensor:
    with torch.no_grad():
        ref_h = batch.reference(batch.ids, batch.mask)
    s, c = chunked_relabelled_kl(batch.hidden, ref_h, batch.head, batch.ids, batch.mask,
                                 lambda ry: lowered_logit_logp(ry, config.undial_gamma), batch.chunk_size)
    return s / c.clamp(min=1)


UNDIAL = Method("undial", "UNDIAL: distil towards the reference with the true token's logit lowered by undial_gamma",
                dict(forget_loss="undial", iur=True), undial_forget_loss)
