"""Gradient ascent on the forget NLL: ICU's KUI term and the baselines built on it.

- icu_ga:    ICU with icu-peft's selective choices (ascent on still-predicted tokens, extra retain
             anchors); the project's default until calibrated forgetting (methods/target.py).
- icu_paper: the objective of ICU's reference code (every token ascends; neighbours only).
- ga:        Jang et al.'s KUMPR: ascent alone until the set's means pass.
- graddiff:  ascent + NLL on retain text.
"""

from __future__ import annotations

import torch

from ..losses import chunked_token_nll
from .base import ForgetBatch, Method


def ascent_loss(batch: ForgetBatch, config) -> torch.Tensor:
    """Minus the mean next-token NLL of the forget batch (minimising it ascends the NLL)."""
    s, c = chunked_token_nll(batch.hidden, batch.head, batch.ids, batch.mask, batch.chunk_size,
                             only_predicted=config.forget_tokens == "predicted", weights=batch.weights)
    return -(s / c.clamp(min=1))


ICU_GA = Method("icu_ga", "ICU (KUI+CLE+IUR) with ascent on still-predicted tokens and extra retain anchors",
                dict(forget_loss="ga"), ascent_loss)
ICU_PAPER = Method("icu_paper", "ICU's reference objective: every token ascends, neighbours only, one pass per step",
                   dict(forget_loss="ga", forget_tokens="all", retain_kl_samples=0, neighbour_micro_batch=0),
                   ascent_loss)
GA = Method("ga", "Jang et al.'s KUMPR: gradient ascent alone until the set's means pass",
            dict(forget_loss="ga", learn_weight=0.0, kl_weight=0.0, num_neighbours=0, iur=False, forget_tokens="all",
                 retain_kl_samples=0), ascent_loss)
GRADDIFF = Method("graddiff", "gradient ascent + NLL on retain text",
                  dict(forget_loss="ga", learn_weight=1.0, kl_weight=0.0, iur=False, forget_tokens="all",
                       retain_kl_samples=0), ascent_loss)
