"""IUR (Iterative Unlearning Refinement): which forget samples count as forgotten.

A sample is forgotten when the model scores it no higher than text of the same kind it never saw.
Forgotten samples (and their neighbours) leave the active set; scores are recomputed after every
epoch, so a sample whose memory comes back re-enters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Tuple

import torch

from .metrics import Scores


@dataclass
class Thresholds:
    """The 'forgotten' line: mean MA / EL_n on unseen text (or given values), and ICU's BLEU cut."""

    ma: float
    el: float
    bleu: float = 0.01
    source: str = "default"  # unseen | config | default
    unseen_count: Optional[int] = None
    nll: Optional[float] = None  # loss level the adapter is calibrated towards (config.nll_target); None: off
    # the never-seen band's NLL edges (calibrate.Band): a forgotten sample's NLL lies between them
    nll_lo: Optional[float] = None
    nll_hi: Optional[float] = None
    # the unseen text's mean MA / EL_n (Jang et al.'s set-level line; `ma`/`el` are the band's upper edges)
    ma_mean: Optional[float] = None
    el_mean: Optional[float] = None
    # the never-seen samples' lowest and highest NLL: a chance outlier of the NLL edges stays within them
    nll_min: Optional[float] = None
    nll_max: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)


def is_forgotten(ma: float, el: float, thresholds: Thresholds, bleu: Optional[float] = None,
                 criterion: str = "ma_el", nll: Optional[float] = None) -> bool:
    """ma_el: MA and EL_n at or below their thresholds. bleu: generated-suffix BLEU below the cut.

    With the never-seen band's NLL edges in `thresholds` and the sample's `nll`, the NLL must also lie
    inside them: text pushed past every never-seen text is as recognisable as memorised text.
    """
    if nll is not None and thresholds.nll_lo is not None and not thresholds.nll_lo <= nll <= thresholds.nll_hi:
        return False
    if criterion == "bleu":
        if bleu is None:
            raise ValueError("criterion 'bleu' needs BLEU scores")
        return bleu < thresholds.bleu
    # el is None when lazy scoring skipped it, which it does only where MA already fails
    return ma <= thresholds.ma and el is not None and el <= thresholds.el


def chance_outliers(m: int, k: int, alpha: float = 0.05) -> int:
    """How many of m samples drawn like k never-seen ones may lie above every one of those k by chance:
    the largest j with P(at least j of the m rank above all k) >= alpha.

    Under exchangeability that probability is m(m-1)...(m-j+1) / ((k+m)(k+m-1)...(k+m-j+1)): with
    k = 16 never-seen samples, one of 8 lies above them all a third of the time, two 10%, three 3%.
    """
    j, p = 0, 1.0
    while j < m:
        p *= (m - j) / (k + m - j)
        if p < alpha:
            break
        j += 1
    return j


def forgotten_mask(scores: Scores, thresholds: Thresholds, criterion: str = "ma_el",
                   samples: Optional[int] = None) -> List[bool]:
    """is_forgotten per sample, with the chance allowance of the never-seen band (with_chance_outliers).
    `samples`: how many distinct samples the scores hold (scores of several precisions, concatenated)."""
    bleu = scores.bleu if scores.bleu is not None else [None] * len(scores.ma)
    nll = scores.nll if scores.nll is not None else [None] * len(scores.ma)
    flags = [is_forgotten(m, e, thresholds, b, criterion, n) for m, e, b, n in zip(scores.ma, scores.el, bleu, nll)]
    if criterion != "ma_el" or scores.nll is None:
        return flags
    return with_chance_outliers(flags, scores.ma, scores.el, scores.nll, thresholds, samples)


def with_chance_outliers(flags: List[bool], ma: List[float], el: List[Optional[float]], nll: List[float],
                         thresholds: Thresholds, samples: Optional[int] = None) -> List[bool]:
    """`flags` (is_forgotten per sample, criterion ma_el) with chance outliers of the MA / EL_n edges let in.

    Those edges are the highest never-seen value (MA: plus one token): an upper limit measured on k
    samples. Applied to each of m samples, it rejects text the model never saw: a model trained
    without the forget set (the oracle) failed it on 2 of 6 logins and 2 of 8 records of a tied
    Llama, by EL_n 0.02-0.03 against an edge of 0.007-0.012 (template n-grams that greedy roll-outs
    hit by chance). So up to chance_outliers(m, k) samples may lie above one of the two edges, where
    nothing else is familiar: NLL inside the band and the other score within its edge. The smallest
    excesses are taken first; beyond the allowance a sample stays too familiar. (The other score had to
    be at most the never-seen mean until 2026-12-07: with the targets at the band's median, half of a
    centred set's samples sit over that mean, and a logins request ended partial on one sample at EL_n
    0.012 against an edge of 0.0098 with MA 0.45 against a mean of 0.44, where the oracle itself, never
    trained on the set, scores two of its six samples at 0.019 and 0.034.)

    The NLL edges are quantiles (10% and 90% of k never-seen samples): one never-seen sample in five lies
    outside them by construction. A sample outside them but within the never-seen samples' own range
    (`nll_min`..`nll_max`), its MA and EL_n within their edges, is a chance outlier of the same allowance: a
    set drawn like never-seen text has such samples as often as the MA / EL_n outliers above, or more.
    Excesses are compared in their own units (MA, EL_n, nats), smallest first. Only for
    edges measured on never-seen text (source 'unseen'), not for thresholds a user gave. With
    `samples` (< len(flags): the same samples scored in several precisions, entry i is sample
    i % samples) the allowance counts samples, not entries.
    """
    t = thresholds
    if (all(flags) or t.source != "unseen" or not t.unseen_count or t.nll_lo is None or t.nll_hi is None
            or t.ma_mean is None or t.el_mean is None):
        return flags
    excess = []
    for i, (m, e, n) in enumerate(zip(ma, el, nll)):
        if flags[i] or e is None or n is None:
            continue
        if not t.nll_lo <= n <= t.nll_hi:
            # outside the band's NLL quantiles, within the never-seen range, nothing else familiar
            if t.nll_min is not None and t.nll_max is not None and t.nll_min <= n <= t.nll_max and m <= t.ma \
                    and e <= t.el:
                excess.append((t.nll_lo - n if n < t.nll_lo else n - t.nll_hi, i))
            continue
        if m > t.ma and e <= t.el:
            excess.append((m - t.ma, i))
        elif e > t.el and m <= t.ma:
            excess.append((e - t.el, i))
    n = samples or len(flags)
    allowed, taken, out = chance_outliers(n, t.unseen_count), set(), list(flags)
    for _, i in sorted(excess):
        if i % n in taken or len(taken) < allowed:
            taken.add(i % n)
            out[i] = True
    return out


@dataclass
class Calibration:
    """Outcome of `calibrate_nll`: the scale kept for the adapter and the forget set's mean NLL around it."""

    target: float
    scale: float
    nll_before: float  # mean NLL of the forget set at scale 1 (as trained)
    nll_after: float
    probes: int  # scales scored, besides 1

    def to_dict(self) -> dict:
        return asdict(self)


def _mean_nll(scores: Scores) -> float:
    return float(sum(scores.nll) / len(scores.nll))


def calibrate_nll(lora_b: List, score_at: Callable[[], Scores], scores: Scores, thresholds: Thresholds,
                  criterion: str = "ma_el", tolerance: float = 0.5, max_scale: float = 2.0,
                  probes: int = 6) -> Tuple[Calibration, Scores]:
    """Scale the adapter's LoRA B weights so the forget set's mean NLL lands near thresholds.nll.

    Gradient ascent stops when MA/EL pass, not when the loss looks like text never seen; it usually
    overshoots (forgotten text ends far *less* likely than unseen text, which membership inference
    detects as surely as memorised text) and sometimes stops short. The adapter's output is linear in
    its B matrices, so scaling them by s moves between the base (s = 0: memorised) and a stronger
    forget; the forget set's loss rises with s.

    Loss too high at s = 1: bisection in (0, 1) for the smallest scale at which every sample is still
    forgotten (forgetting switches on sharply in s, so a plain search for the target loss lands where
    nothing is forgotten), then, if that scale's loss is below the target, bisection between it and 1
    for the loss. Loss too low: bisection in (1, max_scale) for the loss (a stronger adapter forgets
    at least as much; checked). Each step scores the forget set once; EL only where MA passes.

    `scores`: complete scores at scale 1. `score_at()` scores the forget set as the weights are now
    (EL may be skipped where MA fails). Returns the calibration and the scores at the kept scale; the
    weights are left scaled.
    """
    target = float(thresholds.nll)
    original = [p.detach().clone() for p in lora_b]
    used = 0

    def set_scale(s: float) -> None:
        with torch.no_grad():
            for p, p0 in zip(lora_b, original):
                p.copy_(p0 * s)

    def at(s: float) -> Scores:
        nonlocal used
        set_scale(s)
        used += 1
        return score_at()

    def ok(sc: Scores) -> bool:
        return all(forgotten_mask(sc, thresholds, criterion))

    first = _mean_nll(scores)
    best = (1.0, scores)
    if abs(first - target) > tolerance:
        if first > target:
            lo, hi = 0.0, 1.0  # lo: not forgotten (the base), hi: forgotten
            for _ in range(probes // 2 + probes % 2):
                mid = (lo + hi) / 2
                sc = at(mid)
                if ok(sc):
                    hi, best = mid, (mid, sc)
                else:
                    lo = mid
            lo, hi = best[0], 1.0  # loss rises from lo to hi; every scale in between forgets
        else:
            lo, hi = 1.0, max_scale
        if _mean_nll(best[1]) < target:
            for _ in range(probes // 2 if first > target else probes):
                mid = (lo + hi) / 2
                sc = at(mid)
                if not ok(sc):
                    lo = mid  # too weak after all: only stronger scales qualify
                    continue
                if abs(_mean_nll(sc) - target) < abs(_mean_nll(best[1]) - target):
                    best = (mid, sc)
                if _mean_nll(sc) > target:
                    hi = mid
                else:
                    lo = mid
    set_scale(best[0])
    return Calibration(target=target, scale=best[0], nll_before=first, nll_after=_mean_nll(best[1]),
                       probes=used), best[1]
