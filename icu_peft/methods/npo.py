"""Preference-style forget terms: NPO (Zhang et al. 2024) and SimNPO (Fan et al. 2024).

Both behave like gradient ascent while the forget text is still likely and fade as it becomes
unlikely, so they do not run away; NPO measures "unlikely" against the reference, SimNPO against a
length-normalised margin and needs no reference pass.
"""

from __future__ import annotations

import torch

from ..losses import chunked_sequence_logprob, npo_loss, simnpo_loss
from .base import ForgetBatch, Method


def npo_forget_loss(batch: ForgetBatch, config) -> torch.Tensor:
    logp = chunked_sequence_logprob(batch.hidden, batch.head, batch.ids, batch.mask, batch.chunk_size)
    with torch.no_grad():
        ref_logp = chunked_sequence_logprob(batch.reference(batch.ids, batch.mask), batch.head, batch.ids, batch.mask,
                                            batch.chunk_size)
    return npo_loss(logp, ref_logp, config.npo_beta)


def simnpo_forget_loss(batch: ForgetBatch, config) -> torch.Tensor:
    logp = chunked_sequence_logprob(batch.hidden, batch.head, batch.ids, batch.mask, batch.chunk_size)
    lengths = (batch.mask[:, 1:] * batch.mask[:, :-1]).sum(1).to(logp)
    return simnpo_loss(logp, lengths, config.simnpo_beta, config.simnpo_gamma)


NPO = Method("npo", "negative preference optimisation on the forget set + NLL on retain text",
             dict(forget_loss="npo", learn_weight=1.0, kl_weight=0.0, iur=False, retain_kl_samples=0), npo_forget_loss)
SIMNPO = Method("simnpo", "SimNPO (reference-free, length-normalised NPO) + NLL on retain text",
                dict(forget_loss="simnpo", learn_weight=1.0, kl_weight=0.0, iur=False, retain_kl_samples=0),
                simnpo_forget_loss)
