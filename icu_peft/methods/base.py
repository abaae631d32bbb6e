"""What every unlearning method is: a config preset plus a forget term over one batch.

The loop (unlearner.py) builds a `ForgetBatch` and asks the request's method for its forget loss;
the neighbour terms (NLL and KL to the reference on retain text, ICU's CLE) are the loop's own and
are weighted by the preset. The loop knows no method by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclass
class ForgetBatch:
    """One step's forget samples as the method sees them."""

    hidden: torch.Tensor  # (B, T, D) final hidden states, with grad
    head: Callable  # hidden -> logits
    ids: torch.Tensor  # (B, T) right-padded token ids
    mask: torch.Tensor  # (B, T) 1 = real token
    reference: Callable  # (ids, mask) -> the frozen reference's final hidden states (no grad)
    rows: List[int]  # which forget samples these are (index into the forget set)
    chunk_size: int = 64
    weights: Optional[torch.Tensor] = None  # (B, T) per-token weights (distinct n-grams); None: all
    state: Any = None  # what the method's `prepare` returned


@dataclass
class PrepareContext:
    """What a method may look at before training (all measured on the untouched base)."""

    ref_nll: List[torch.Tensor]  # per forget sample, (T-1,): the base's NLL of each next token
    ref_other: List[torch.Tensor]  # per forget sample, (T-1,): log-prob of the best other token
    unseen_token_nll: Optional[torch.Tensor]  # every next-token NLL of the never-seen text
    band: Any  # calibrate.Band or None (no never-seen text)
    ma_max: float  # the MA a forgotten sample may keep
    weights: Optional[List[torch.Tensor]]  # per forget sample (T,) distinct-token masks, or None
    shared: Optional[List[torch.Tensor]] = None  # per forget sample (T-1,): losses.shared_context with the kept / never-seen text
    # entropy_weight: next-token entropies under the base, per forget sample (T-1,) and of every never-seen token
    ref_entropy: Optional[List[torch.Tensor]] = None
    unseen_token_entropy: Optional[torch.Tensor] = None


@dataclass
class Method:
    """An unlearning method: its name, its config fields, its forget loss (minimised) and an optional prepare."""

    name: str
    help: str
    preset: Dict[str, Any]
    forget_loss: Callable[[ForgetBatch, Any], torch.Tensor]  # (batch, config) -> scalar to minimise
    prepare: Optional[Callable[[PrepareContext, Any], Any]] = None  # (context, config) -> batch.state
    # (state, sample, nats, limit) -> shift in force: move a sample's target (methods with per-sample targets)
    retarget: Optional[Callable[[Any, int, float, float], float]] = None
    # (state, UnseenNow, config) -> None: methods that aim at the never-seen text follow it as the adapter
    # moves it (the attacker compares with never-seen text under the model they hold)
    follow_unseen: Optional[Callable[[Any, "UnseenNow", Any], None]] = None
    # (state, tilt) -> None: scale the spread of every sample's per-token targets around their mean by
    # 1 + tilt (methods with per-token targets; the loop steers it by the Min-K% attack)
    reshape: Optional[Callable[[Any, float], None]] = None
    # (state, past) -> None: per sample, whether it sits past the band in some view after the last scoring
    # (methods whose forget term can pull a sample back, and pulls harder once one is past)
    mark_past: Optional[Callable[[Any, List[bool]], None]] = None
    # (state, sample, nats, limit) -> shift in force: move the targets of a sample's hardest fifth of tokens
    # against its others at the same mean (methods with per-token targets; the loop steers it by Min-K%)
    retarget_tail: Optional[Callable[[Any, int, float, float], float]] = None
    # (state, sample, nats, limit) -> shift in force: move the entropy targets of a sample's hardest fifth of
    # positions (methods with per-position entropy targets; the loop steers it by Min-K%++)
    retarget_tail_entropy: Optional[Callable[[Any, int, float, float], float]] = None


@dataclass
class UnseenNow:
    """The never-seen text as the trained model has it now (one teacher-forced pass, the shipped view)."""

    token_nll: torch.Tensor  # every never-seen next token's NLL, samples one after another
    token_entropy: Optional[torch.Tensor]  # the same positions' next-token entropies (None: not measured)
    goal: float  # the never-seen samples' median NLL: where a forgotten sample's mean NLL aims
    cap: float  # their upper settle quantile: no target's mean NLL goes past it
