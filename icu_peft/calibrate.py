"""Where "forgotten" lies, and how a forget request finds its own step size.

Four pure pieces, each tested on hand-made numbers:

- `Band`: the never-seen band. Text the model never saw is not one number but a distribution: its
  per-sample NLL, MA and EL_n spread over a range. A forgotten sample must land *inside* that range.
  Below the lower NLL edge it is still more familiar than unseen text (a loss attack finds it);
  above the upper edge it was pushed past unseen text, which a loss attack finds just as surely
  (forgotten text that no never-seen text resembles is exactly who filed the request).
- `token_targets`: per-token target probabilities for the calibrated objective (methods/target.py).
  Each forget sample's tokens are rank-matched to the never-seen text's per-token NLL distribution
  (its easiest token gets an easy unseen token's NLL, its hardest a hard one's), then shifted per
  sample until the sample's mean NLL sits at the middle of the band and its MA is inside it. Tokens
  the base already finds harder than their target keep the base's own probability. Everything is
  computed from the frozen base's per-token statistics, before a single step.
- `StepSize`: the learning rate found during training. It escalates while the forget set's distance
  to the band stalls and backs off (with the last good adapter restored) when the retain set is
  damaged; so the same defaults serve a 2-layer toy and an 8B model.
- `StepBudget`: how many steps a request gets. It grows while a request that has not forgotten every
  sample still closes in on the band at its end, and stops one that stalls there.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch


# ------------------------------------------------------------------------------ the never-seen band

def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("quantile of an empty list")
    pos = q * (len(xs) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Band:
    """The never-seen band: central quantile ranges of the unseen text's per-sample NLL, and the
    highest MA / EL_n any never-seen sample has.

    `outer` edges (quantiles q and 1-q) decide whether a sample is forgotten; the tighter `inner`
    edges (quantiles s and 1-s) decide when a sample may leave the batch, so the set ends around the
    middle of the band instead of piled up at an edge (where an attack would still find it).
    """

    nll_lo: float
    nll_hi: float
    nll_mid: float
    inner_lo: float
    inner_hi: float
    ma_hi: float
    ma_mid: float
    el_hi: Optional[float]
    count: int
    quantile: float
    settle_quantile: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_scores(cls, nll: Sequence[float], ma: Sequence[float], el: Optional[Sequence[Optional[float]]],
                    q: float = 0.1, settle: float = 0.25, lengths: Optional[Sequence[int]] = None) -> "Band":
        """The band of never-seen samples' per-sample NLL / MA / EL_n (EL may be missing).

        `lengths` (tokens per never-seen sample): MA moves in steps of 1/(T-1), so its edge gets one
        step of slack at the median length; on 15-token records a single template token decides.
        """
        if not nll:
            raise ValueError("the never-seen band needs at least one sample")
        if not 0 <= q < 0.5 or not q <= settle < 0.5:
            raise ValueError("need 0 <= quantile <= settle_quantile < 0.5")
        els = [e for e in (el or []) if e is not None]
        # MA / EL are upper limits only, and on short texts they move in steps of one token: their
        # edge is the highest never-seen value (plus one MA step), not a quantile of a handful of steps
        ma_step = 1.0 / max(quantile(lengths, 0.5) - 1, 1) if lengths else 0.0
        return cls(nll_lo=quantile(nll, q), nll_hi=quantile(nll, 1 - q), nll_mid=quantile(nll, 0.5),
                   inner_lo=quantile(nll, settle), inner_hi=quantile(nll, 1 - settle),
                   ma_hi=max(ma) + ma_step, ma_mid=quantile(ma, 0.5), el_hi=max(els) if els else None,
                   count=len(nll), quantile=q, settle_quantile=settle)


def band_position(nll: Optional[float], ma: float, el: Optional[float], band: Band, inner: bool = False) -> int:
    """-1: still too familiar (NLL under the band, or MA / EL over it); 0: inside; +1: pushed past it."""
    lo, hi = (band.inner_lo, band.inner_hi) if inner else (band.nll_lo, band.nll_hi)
    if nll is not None and nll > hi:
        return 1
    if ma > band.ma_hi or (nll is not None and nll < lo):
        return -1
    if band.el_hi is not None and (el is None or el > band.el_hi):
        return -1  # EL missing: lazy scoring skipped it because MA already failed
    return 0


def loss_auc(forget_nll: Sequence[float], unseen_nll: Sequence[float]) -> float:
    """ROC-AUC of a loss attack that calls the lower-NLL text a member: P(forget < unseen), ties half.

    0.5: the forget set's losses are spread like never-seen text's; 1: every forgotten sample is
    still more familiar than every never-seen one; 0: pushed past all of them (also a tell).
    """
    if not forget_nll or not unseen_nll:
        raise ValueError("loss_auc needs two non-empty sets")
    wins = sum((f < u) + 0.5 * (f == u) for f in forget_nll for u in unseen_nll)
    return float(wins / (len(forget_nll) * len(unseen_nll)))


def view_aucs(forget_nll: Sequence[float], unseen_nll: Sequence[float], views: int = 1) -> List[float]:
    """loss_auc per precision view: both lists hold `views` equal blocks, view after view (the loop scores
    the forget set and the never-seen samples in every view the adapter ships in).

    An attacker holds one model, so each view's forget set is compared with the never-seen text under the
    same view. Pooled over views, a per-view offset hides a set that a single view tells apart: on a
    fresh Llama memoriser the adapter lowered never-seen text of the request's kind by 0.4 nats in the
    4-bit view it trained in and not in the fp32 merge, and the request settled at a pooled AUC of 0.44
    while the 4-bit view alone (the shipped adapter) gave 0.32."""
    if views < 1 or len(forget_nll) % views or len(unseen_nll) % views:
        raise ValueError(f"{len(forget_nll)} forget and {len(unseen_nll)} never-seen scores do not split into {views} views")
    n, m = len(forget_nll) // views, len(unseen_nll) // views
    return [loss_auc(forget_nll[k * n:(k + 1) * n], unseen_nll[k * m:(k + 1) * m]) for k in range(views)]


def auc_null_sd(m: int, k: int) -> float:
    """The standard deviation of a ROC-AUC between m and k samples drawn from one distribution (the
    Mann-Whitney statistic's, sqrt((m + k + 1) / (12 m k))): 0.14 for 6 against 16, 0.10 for 16 against 16,
    0.26 for 2 against 5."""
    return math.sqrt((m + k + 1) / (12.0 * m * k)) if m > 0 and k > 0 else 0.5


# half the width of the central half of a normal distribution, in standard deviations
CENTRAL_HALF_Z = 0.6745


def auc_null_counts(m: int, k: int) -> List[int]:
    """How many of the C(m + k, m) equally likely orders of m samples among k put U = u pairs (a forget sample
    under a never-seen one) in order, for u = 0 .. m k: the coefficients of the Gaussian binomial [m + k, m]_q,
    prod over i of (1 - q^(k + i)) / (1 - q^i), each factor applied exactly on integers."""
    m, k = min(m, k), max(m, k)  # the same distribution either way round
    c = [1] + [0] * (m * k)
    for i in range(1, m + 1):
        for u in range(len(c) - 1, k + i - 1, -1):  # times (1 - q^(k + i))
            c[u] -= c[u - k - i]
        for u in range(i, len(c)):  # divided by (1 - q^i)
            c[u] += c[u - i]
    return c


@functools.lru_cache(maxsize=64)
def loss_tolerance(settle_auc: float, m: int, k: int) -> float:
    """How far from 0.5 the loss attack's AUC, m forget samples against k never-seen ones, may sit for the set to
    count as centred: settle_auc, or where the samples are too few for it, the smallest distance a set drawn
    like the never-seen samples comes within at least half the time (exact, auc_null_counts, up to 4096 pairs;
    beyond, CENTRAL_HALF_Z x auc_null_sd). 6 against 16 keep 0.1; the demo's 2 against 8 take 0.1875: its AUC
    moves in steps of 1/16, a set drawn like never-seen text lands within 0.1 of 0.5 29% of the time, and the
    demo trained 24 of its 68 steps on a set at 0.375, inside the band, until its patience ran out."""
    if m <= 0 or k <= 0:
        return settle_auc
    if m * k > 4096:
        return max(settle_auc, CENTRAL_HALF_Z * auc_null_sd(m, k))
    counts = auc_null_counts(m, k)
    total, within = sum(counts), 0
    # distances from the middle, nearest first: u and m k - u (one value where they meet)
    for lo in range((m * k) // 2, -1, -1):
        hi = m * k - lo
        within += counts[lo] + (counts[hi] if hi != lo else 0)
        if 2 * within >= total:
            return max(settle_auc, (hi - lo) / (2.0 * m * k))
    return settle_auc


def centring_tolerance(tolerance: float, m: int, k: int) -> float:
    """How close to 0.5 a loss attack's AUC must come, m samples against k, once it found the set off centre
    (the hysteresis of _Run.off_centre): half of `tolerance`, but never finer than the AUC's own step 1 / (m k)
    nor than half its null standard deviation (auc_null_sd), and never wider than `tolerance` itself.

    Half of 0.1 asked 6 samples against 16 (sd 0.14) for a set closer to the never-seen samples than chance
    puts a second draw of never-seen text: a prose memoriser's set sat at AUC 0.43-0.44, inside 0.1 but not
    0.05, for 220 steps while the centring pulled its samples back up the MA scale, and ended partial (5/6)."""
    return min(tolerance, max(tolerance / 2, 1.0 / max(m * k, 1), auc_null_sd(m, k) / 2))


def off_centre(forget_nll: Sequence[float], unseen_nll: Sequence[float], tolerance: float) -> int:
    """+1 when a loss attack still finds the set too familiar (AUC > 0.5 + tolerance), -1 when pushed
    past never-seen text (AUC < 0.5 - tolerance), 0 when centred."""
    auc = loss_auc(forget_nll, unseen_nll)
    return 1 if auc > 0.5 + tolerance else -1 if auc < 0.5 - tolerance else 0


def band_gap(nll: Optional[float], ma: float, band: Band) -> float:
    """How far a sample is from the band's middle, in units of the band's width (0 inside the inner band).

    The step-size controller watches the sum of these over the forget set: it falls while training
    makes progress and stalls when the step size is too small to move anything.
    """
    width = max(band.nll_hi - band.nll_lo, 1e-3)
    gap = max(0.0, ma - band.ma_hi) * 4.0  # an MA excess of 0.25 weighs like one band width
    if nll is not None:
        gap += max(0.0, band.inner_lo - nll, nll - band.inner_hi) / width
    return gap


# ------------------------------------------------------------------------------ attacks on the hardest tokens

@dataclass
class TailAttack:
    """An attack on each sample's hardest fifth of tokens (Min-K%, Min-K%++) as the loop steers it: one score
    per forget sample and per never-seen sample from the shipped view at the last scoring, oriented like an NLL
    (higher: less familiar), and the forget samples' scores at the scoring before (their trend). `units`, per
    forget sample: how much of the method's knob one unit of score takes (1 where the score is in nats)."""

    mine: List[float] = field(default_factory=list)
    unseen: List[float] = field(default_factory=list)
    last: Optional[List[float]] = None
    units: Optional[List[float]] = None
    centring: bool = False  # found off centre: trains until within half the tolerance (as _Run.off_centre)

    def update(self, mine: Sequence[float], unseen: Sequence[float], units: Optional[Sequence[float]] = None) -> None:
        self.last = list(self.mine) if len(self.mine) == len(mine) else None
        self.mine, self.unseen = list(mine), list(unseen)
        self.units = list(units) if units is not None else None

    def auc(self) -> Optional[float]:
        """The attack's ROC-AUC (0.5: the forget samples look like never-seen ones; > 0.5 familiar)."""
        return loss_auc(self.mine, self.unseen) if self.mine and self.unseen else None

    def tolerance(self, tolerance: float) -> float:
        """`tolerance`, or the AUC's standard deviation where the samples are too few for it (auc_null_sd):
        steering on a departure chance alone shows fits the given never-seen samples, not never-seen text."""
        return max(tolerance, auc_null_sd(len(self.mine), len(self.unseen)))

    def side(self, tolerance: float) -> int:
        """off_centre at tolerance(`tolerance`), or once found off centre at half of it (never under the AUC's
        own step)."""
        if not (self.mine and self.unseen):
            return 0
        tolerance = self.tolerance(tolerance)
        if self.centring:
            tolerance = max(tolerance / 2, 1.0 / (len(self.mine) * len(self.unseen)))
        side = off_centre(self.mine, self.unseen, tolerance)
        self.centring = side != 0
        return side

    def excess(self, tolerance: float) -> float:
        auc = self.auc()
        return 0.0 if auc is None else max(0.0, abs(auc - 0.5) - self.tolerance(tolerance))

    def centre(self) -> float:
        return quantile(self.unseen, 0.5)

    def wrong_side(self, side: int) -> List[bool]:
        """Per forget sample: on the side of the never-seen median the attack finds the set on."""
        c = self.centre()
        return [(x < c) if side > 0 else (x > c) for x in self.mine] if side else [False] * len(self.mine)

    def moves(self, side: int) -> List[Tuple[int, float]]:
        """(sample, score to add) for each sample on the wrong side whose score has stalled there: half way to
        the never-seen median. Stalled: it closed less than a quarter of its gap over the last round, or moved
        away. The tokens lag their targets, and moving the targets of samples still on their way overshot (a
        tiny memoriser's two records went 1 nat past the never-seen median and took 10 rounds to come back)."""
        c = self.centre()
        last = self.last if self.last is not None else self.mine
        out = []
        for i, (wrong, x, before) in enumerate(zip(self.wrong_side(side), self.mine, last)):
            gap = c - x
            if wrong and (x - before) * gap < 0.25 * gap * gap:
                out.append((i, 0.5 * gap))
        return out

    def limit(self) -> float:
        """How far in all a sample's knob may move, in score units: the never-seen scores' range."""
        return (max(self.unseen) - min(self.unseen)) if self.unseen else 0.0


# ------------------------------------------------------------------------------ per-token targets

@dataclass
class TokenTargets:
    """Per forget sample: the target log-probability of each next token, and the shift it took."""

    logp: List[torch.Tensor]  # per sample, (T-1,): log p*(x_t+1 | x_<=t), <= the base's own log-prob
    shift: List[float]  # nats added to the rank-matched unseen NLLs
    nll: List[float]  # the target's mean NLL per sample
    ma: List[float]  # the target's MA per sample (tokens whose target stays the argmax)
    ref: List[torch.Tensor] = field(default_factory=list)  # per sample: the base's NLL of each next token
    shifted: List[torch.Tensor] = field(default_factory=list)  # per sample: the shifted rank-matched NLLs (0 where fixed)
    free: List[torch.Tensor] = field(default_factory=list)  # per sample: the tokens the target may change
    moved: List[float] = field(default_factory=list)  # per sample: nats added since (move)
    # entropy_weight: per sample (T-1,), the next-token entropy each position aims at (entropy_targets)
    entropy: List[torch.Tensor] = field(default_factory=list)
    rank: List[torch.Tensor] = field(default_factory=list)  # per sample: each token's index into the sorted never-seen NLLs
    ref_entropy: List[torch.Tensor] = field(default_factory=list)  # per sample: the base's next-token entropies
    unseen_order: Optional[torch.Tensor] = None  # the never-seen tokens in the order of their base NLL (rank's order)
    tilt: float = 0.0  # the spread of every target around its mean, scaled by 1 + tilt (reshape)
    remake: Optional[Callable[..., "TokenTargets"]] = None  # token_targets again with (unseen_token_nll, nll_goal=, nll_cap=)
    past: set = field(default_factory=set)  # samples pushed past the band at the last scoring (mark_past)
    tail: List[torch.Tensor] = field(default_factory=list)  # per sample: its hardest fifth of free tokens by target (hardest_fifth)
    tail_moved: List[float] = field(default_factory=list)  # per sample: nats added to the tail's targets (move_tail)
    # per sample: nats of next-token entropy added to the tail positions' entropy targets (move_tail_entropy)
    tail_entropy_moved: List[float] = field(default_factory=list)
    paired_entropy: List[torch.Tensor] = field(default_factory=list)  # the entropy targets before those moves

    def summary(self) -> dict:
        n = max(len(self.nll), 1)
        out = {"mean_nll": sum(self.nll) / n, "mean_ma": sum(self.ma) / n, "mean_shift": sum(self.shift) / n}
        if any(self.moved):
            out["moved"] = sum(1 for m in self.moved if m)
        if self.tilt:
            out["tilt"] = self.tilt
        if any(self.tail_moved):
            out["tail_moved"] = sum(1 for m in self.tail_moved if m)
        if any(self.tail_entropy_moved):
            out["tail_entropy_moved"] = sum(1 for m in self.tail_entropy_moved if m)
        if self.entropy:
            ent = torch.cat(self.entropy)
            out["mean_entropy"] = float(ent.mean()) if ent.numel() else 0.0
        return out

    def move(self, i: int, delta: float, limit: float) -> float:
        """Shift sample i's target by `delta` nats on the tokens it may change (kept within +-`limit` of
        where token_targets put it); returns the shift now in force.

        The loop's integral term: a sample can sit off its target for good when some of its tokens cannot
        reach theirs (pinned by the retain terms, or by the other precision the adapter must also suit);
        moving the target of the tokens that can move brings the sample's mean where it must be."""
        self.moved[i] = max(-limit, min(limit, self.moved[i] + delta))
        self._aim(i)
        return self.moved[i]

    def move_tail(self, i: int, delta: float, limit: float) -> float:
        """Shift the targets of sample i's hardest fifth of tokens by `delta` nats and scale its other free
        tokens the other way, so the sample's mean target stays (tail_shifted; the shift kept within
        +-`limit` in all); returns the shift now in force. The loop steers it by the Min-K% attack
        (_Run.steer_tails): that attack reads a sample's hardest fifth, which the mean-level controls (move,
        the centring) leave where the tokens could go."""
        if not self.tail_moved:
            return 0.0
        self.tail_moved[i] = max(-limit, min(limit, self.tail_moved[i] + delta))
        self._aim(i)
        return self.tail_moved[i]

    def move_tail_entropy(self, i: int, delta: float, limit: float) -> float:
        """Add `delta` nats to the entropy targets of sample i's tail positions (within +-`limit` in all, never
        under 0 nats); returns the shift now in force. The loop steers it by the Min-K%++ attack, which reads
        the true token's log-prob against its distribution's mean and spread: at the same loss, a flatter
        position looks more familiar than a confidently wrong one (_Run.steer_tails)."""
        self.tail_entropy_moved[i] = max(-limit, min(limit, self.tail_entropy_moved[i] + delta))
        self._aim_entropy(i)
        return self.tail_entropy_moved[i]

    def _aim_entropy(self, i: int) -> None:
        """Sample i's entropy targets: the paired ones, its tail positions moved by move_tail_entropy."""
        if not self.paired_entropy or not self.tail or i >= len(self.paired_entropy):
            return
        moved = self.tail_entropy_moved[i] if self.tail_entropy_moved else 0.0
        e = self.paired_entropy[i]
        self.entropy[i] = torch.where(self.tail[i], (e + moved).clamp(min=0.0), e) if moved else e

    def pull_tokens(self, i: int) -> Optional[torch.Tensor]:
        """Which of sample i's next tokens the log-space pull back acts on (float (T-1,), 1 = pulled; None:
        none): every token of a sample past the band (mark_past); the tail of a sample whose tail the loop
        made easier (move_tail < 0), since the BCE's own pull on a token 8 nats down is ~1e-4."""
        if i in self.past:
            return torch.ones_like(self.logp[i])
        if self.tail_moved and self.tail_moved[i] < 0:
            return self.tail[i].float()
        return None

    def mark_past(self, past: Sequence[bool]) -> None:
        """Which samples sit past the band now: their tokens are also pulled back in log space
        (losses.target_token_bce's pull_weight), the others keep the BCE's own, fading pull."""
        self.past = {i for i, p in enumerate(past) if p}

    def reshape(self, tilt: float) -> None:
        """Scale every sample's target spread around its mean by 1 + tilt (calibrate.tilted)."""
        self.tilt = tilt
        for i in range(len(self.logp)):
            self._aim(i)

    def _aim(self, i: int) -> None:
        """Sample i's target log-probs from its matched targets, the moves and the tilt."""
        t = torch.where(self.free[i], (self.shifted[i] + self.moved[i]).clamp(min=0.0), self.shifted[i])
        if self.tail_moved and self.tail_moved[i]:
            t = tail_shifted(t, self.free[i], self.tail[i], self.tail_moved[i])
        self.logp[i] = -torch.maximum(self.ref[i], tilted(t, self.free[i], self.tilt))

    def rematch(self, fresh: "TokenTargets") -> None:
        """Take the loss targets of `fresh` (token_targets run again on the same forget samples against the
        never-seen text as the model has it now), keeping the moves and the tilt the loop gave them."""
        self.shifted, self.shift, self.nll, self.ma, self.rank = fresh.shifted, fresh.shift, fresh.nll, fresh.ma, fresh.rank
        self.tail = fresh.tail
        for i in range(len(self.logp)):
            self._aim(i)

    def with_entropy(self, ref_entropy: Sequence[torch.Tensor], unseen_nll: torch.Tensor,
                     unseen_entropy: torch.Tensor) -> "TokenTargets":
        """Add per-position entropy targets (entropy_targets) from the base's entropies of the forget
        samples and the never-seen text's per-token NLLs and entropies (the ones token_targets ranked)."""
        self.ref_entropy = [e.float() for e in ref_entropy]
        self.unseen_order = sorted_order(unseen_nll, unseen_entropy)
        self.follow_unseen(unseen_entropy)
        return self

    def follow_unseen(self, unseen_entropy: torch.Tensor) -> None:
        """Re-aim the entropy targets at the never-seen text's entropies as the model now has them (every
        never-seen token, in the order its NLL was given to with_entropy).

        The adapter moves never-seen text of the request's kind too (on a records memoriser its mean
        entropy doubled), and an attacker compares the forget set with never-seen text under the model
        they have: targets fixed from the base left the forgotten records sharper than never-seen ones."""
        if self.unseen_order is None:
            return
        paired = unseen_entropy.float().flatten()[self.unseen_order]
        self.paired_entropy = entropy_targets(self.shifted, self.ref, self.ref_entropy, self.rank, paired)
        self.entropy = list(self.paired_entropy)
        for i in range(len(self.entropy)):
            self._aim_entropy(i)


def tilted(target_nll: torch.Tensor, free: torch.Tensor, tilt: float) -> torch.Tensor:
    """A sample's per-token target NLLs with their spread around their mean over the `free` tokens scaled
    by 1 + tilt (tilt > 0: hard tokens harder and easy ones easier at the same mean; < 0: flatter);
    never under 0 nats. The other tokens are returned as they are."""
    t = target_nll.float()
    if tilt == 0 or not bool(free.any()):
        return t
    m = t[free].mean()
    return torch.where(free, (m + (t - m) * (1.0 + tilt)).clamp(min=0.0), t)


def hardest_fifth(target_nll: torch.Tensor, free: torch.Tensor, k: float = 0.2) -> torch.Tensor:
    """The ceil(k x T) free tokens with the highest target NLL (ties: the later token), as a bool mask:
    the tokens a Min-K% attack reads once the sample sits at its targets."""
    t = target_nll.float()
    out = torch.zeros(t.numel(), dtype=torch.bool)
    idx = torch.nonzero(free, as_tuple=False).flatten()
    if idx.numel() == 0:
        return out
    m = max(1, math.ceil(k * t.numel()))
    order = torch.argsort(t[idx], stable=True)
    out[idx[order[-m:]]] = True
    return out


def tail_shifted(target_nll: torch.Tensor, free: torch.Tensor, tail: torch.Tensor, delta: float) -> torch.Tensor:
    """A sample's target NLLs with its `tail` tokens `delta` nats harder and its other free tokens scaled the
    other way so that the sum over the free tokens, hence their mean, is unchanged (never under 0 nats: at
    most every other token's target goes to 0). Scaled, not shifted: the easy tokens of a memorised record sit
    near 0 nats and cannot give up a shift, which then raised the sample's level. Tokens not free are
    returned as they are."""
    t = target_nll.float()
    tail = tail & free
    rest = free & ~tail
    if not bool(tail.any()) or delta == 0:
        return t
    raised = (t + delta).clamp(min=0.0)
    given = float((raised - t)[tail].sum())  # what the tail took (less than delta x size where it met 0)
    room = float(t[rest].sum())
    factor = max(0.0, 1.0 - given / room) if room > 0 else 1.0
    return torch.where(tail, raised, torch.where(rest, t * factor, t))


def sorted_order(nll: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
    """The order that sorts the never-seen tokens by NLL (as token_targets ranks them); `entropy` must pair
    with `nll` one to one."""
    nll, entropy = nll.float().flatten(), entropy.float().flatten()
    if nll.numel() != entropy.numel() or nll.numel() == 0:
        raise ValueError("need one entropy per never-seen token NLL, and at least one")
    return torch.argsort(nll, stable=True)


def entropy_targets(target_nll: Sequence[torch.Tensor], ref_nll: Sequence[torch.Tensor],
                    ref_entropy: Sequence[torch.Tensor], rank: Sequence[torch.Tensor],
                    paired_entropy: torch.Tensor) -> List[torch.Tensor]:
    """Per forget sample, (T-1,): the next-token entropy each position should have once forgotten.

    The true token's target alone leaves the rest of the distribution to the model; on a memoriser the
    mass a forgotten token gives up spreads over the whole vocabulary, so forgotten text ended twice as
    uncertain as never-seen text at the same loss (docs/BENCHMARKS.md, "Holding never-seen text to the
    base"), which Min-K%++ reads as membership. token_targets gave each token the loss of the never-seen
    token of the same rank (`rank[i]`: its index in the sorted never-seen NLLs); the position now also
    takes that never-seen token's entropy (`paired_entropy`, in the same order): the pair, not a mean, so
    the forget set inherits the never-seen text's joint spread of loss and uncertainty, confidently wrong
    positions included. A position whose target leaves the base's loss alone (target_nll <= ref_nll)
    keeps the base's own entropy. A target, not a cap: its loss is two-sided (losses.entropy_error).
    """
    out = []
    for t, r, e, k in zip(target_nll, ref_nll, ref_entropy, rank):
        out.append(torch.where(t > r + 1e-6, paired_entropy[k], e.float()))
    return out


def _target_stats(ref_nll: torch.Tensor, ref_other: torch.Tensor, target_nll: torch.Tensor) -> Tuple[float, float]:
    """(mean NLL, MA) of a target that caps each token's NLL from below at `target_nll`.

    The target token gets p* = exp(-max(ref_nll, target_nll)); the other tokens share the rest in
    the base's proportions, so the best other token gets p_other * (1 - p*) / (1 - p_ref).
    """
    nll = torch.maximum(ref_nll, target_nll)
    p_star, p_ref = torch.exp(-nll), torch.exp(-ref_nll)
    rest = torch.where(nll > ref_nll, (1 - p_star) / (1 - p_ref).clamp(min=1e-12), torch.ones_like(p_star))
    other = torch.exp(ref_other) * rest
    return float(nll.mean()), float((p_star >= other).float().mean())


def token_targets(ref_nll: Sequence[torch.Tensor], ref_other: Sequence[torch.Tensor],
                  unseen_token_nll: torch.Tensor, nll_goal: float, ma_max: float,
                  weights: Optional[Sequence[Optional[torch.Tensor]]] = None, iters: int = 40,
                  nll_cap: Optional[float] = None,
                  shared: Optional[Sequence[Optional[torch.Tensor]]] = None) -> TokenTargets:
    """Per-token target NLLs for each forget sample (see the module docstring).

    ref_nll[i]: (T-1,) the base's NLL of each next token of sample i; ref_other[i]: the log-prob of
    the best *other* token at each position. unseen_token_nll: every next-token NLL of the
    never-seen text under the base (the distribution ranks are matched to). nll_goal: the mean NLL
    each sample should reach; ma_max: the MA it may keep at most. weights[i] (optional, (T-1,)):
    0 marks tokens to leave as the base has them (shared template), 1 tokens that may change.

    Per sample a shift d (bisection) is added to the rank-matched NLLs: the smallest d whose target
    has mean NLL >= nll_goal and MA <= ma_max. A sample already there gets d at the low end (no
    change where the base is already above the rank-matched level). With `nll_cap`, d never takes the
    target's mean NLL past it, even where MA would need more: a target beyond the band would teach
    the model exactly the over-forgetting the band forbids (on code-like text, whose syntax tokens
    stay predictable, the MA condition alone put the targets at 2.96 nats against a band top of 2.88).

    shared[i] (optional, (T-1,)): how much of each token's context the text that stays shares
    (losses.shared_context). Tokens rank by it first (most shared = easiest), then by the base's NLL.
    On a memoriser every token's NLL is near 0 and its order noise; rank-matching by it alone gave
    template tokens ("mg of", shared with every kept record) the hard quantiles, and the forget term
    then fought the retain terms on them. Never-seen text of the same kind has its template tokens
    easy and its private ones hard; the ranks now put each forget token where its kind sits there.
    """
    sorted_unseen = torch.sort(unseen_token_nll.float().flatten()).values
    if sorted_unseen.numel() == 0:
        raise ValueError("no unseen tokens to match")
    out = TokenTargets([], [], [], [])
    for i, (nll, other) in enumerate(zip(ref_nll, ref_other)):
        nll, other = nll.float(), other.float()
        T = nll.numel()
        w = weights[i] if weights is not None and weights[i] is not None else None
        free = torch.ones(T, dtype=torch.bool) if w is None else w.bool()
        # rank of each token among this sample's tokens (easiest first) -> the unseen quantile
        key = nll
        if shared is not None and shared[i] is not None:
            # most shared first; the NLL (clamped under the step between levels) orders within a level
            key = -shared[i].float() * 1e4 + nll.clamp(max=1e3)
        ranks = torch.empty(T)
        ranks[torch.argsort(key, stable=True)] = torch.arange(T, dtype=torch.float32)
        u = (ranks + 0.5) / max(T, 1)
        idx = (u * (sorted_unseen.numel() - 1)).round().long()
        matched = sorted_unseen[idx]

        def target_at(d: float) -> torch.Tensor:
            t = (matched + d).clamp(min=0.0)
            return torch.where(free, t, torch.zeros_like(t))  # 0 nats: never below the base's own NLL

        def good(d: float) -> bool:
            m, ma = _target_stats(nll, other, target_at(d))
            return m >= nll_goal - 1e-6 and ma <= ma_max + 1e-9

        def under_cap(d: float) -> bool:
            return nll_cap is None or _target_stats(nll, other, target_at(d))[0] <= nll_cap + 1e-6

        lo = -float(sorted_unseen[-1]) - 1.0
        hi = _bisect_first(good, lo, 1.0, iters)
        if not under_cap(hi):  # MA asked for more than the cap allows: the largest shift under the cap
            hi = max(lo, _bisect_first(lambda d: not under_cap(d), lo, hi, iters) - 1e-9)
        tgt = torch.maximum(nll, target_at(hi))
        m, ma = _target_stats(nll, other, target_at(hi))
        out.ref.append(nll)
        out.rank.append(idx)
        out.shifted.append(target_at(hi))
        out.free.append(free)
        out.moved.append(0.0)
        out.tail.append(hardest_fifth(target_at(hi), free & (target_at(hi) > nll)))
        out.tail_moved.append(0.0)
        out.tail_entropy_moved.append(0.0)
        out.logp.append(-tgt)
        out.shift.append(float(hi))
        out.nll.append(m)
        out.ma.append(ma)
    return out


def _bisect_first(pred, lo: float, hi: float, iters: int) -> float:
    """The smallest d in [lo, ...) with pred(d), for pred monotone in d (hi doubled until it holds, up to 64)."""
    while not pred(hi) and hi < 64.0:
        hi = hi * 2.0 if hi > 0 else 1.0
    if pred(lo):
        return lo
    for _ in range(iters):
        mid = (lo + hi) / 2
        if pred(mid):
            hi = mid
        else:
            lo = mid
    return hi


# ------------------------------------------------------------------------------ the step size

@dataclass
class StepSize:
    """Learning-rate control between scoring rounds (pure bookkeeping; the loop applies it).

    - progress: the forget set's summed band gap fell by less than `stall` (relative) over a round
      -> the step is too small for this model: multiply the rate by `factor` (up to `lr_max`), if
      the retain set is safe (half way or less from where it was to the floor); with the retain
      terms heavier than needed (raised after damage, retain set safe), lighten them first;
    - regress: the gap grew by more than `stall` over a round -> the step overshoots: divide the
      rate by `factor`;
    - damage: the retain set's MA fell below `retain_floor` x its value before the request -> the
      way down hurts the kept text: restore the adapter of the last good round and multiply the
      weight of the retain terms (`retain_pressure`, which the loop applies to the neighbour NLL and
      KL) by `pressure_factor`, at the same rate. Damage within `patience` rounds of a raise of the
      rate undoes the raise instead (the rate is the likely cause); damage again in the very next
      round (or with `pressure_factor` 1) halves the rate as well as raising the pressure. A rate
      halved this way becomes a ceiling, lifted one step after `patience` stalled rounds.
      After `max_backoffs` such restores the request stops (it cannot forget without damage here), unless
      the forget set came `progress_reset` (a quarter) closer to its target since the first of them: then
      the count starts again. A 32-record request of one template (bank transfers, a 3 x 192 tied Llama) spent
      three restores in its first 44 steps (the retain MA 0.942 -> 0.844 with the forget set barely moved),
      then went from 0.18 to 3.6 nats (band 4.37-6.30) and had 11 of 32 samples inside the band when its
      sixth restore stopped it (2/32, exit 4).
    Why the pressure and not the rate alone: when forgetting a set pulls text of the same kind along
    (records that share a template, names, drugs), a smaller step reaches the same damage a few
    rounds later; only a heavier retain term changes the direction. A prescriptions memoriser that
    the defaults stopped on (0 of 8 forgotten, three restores at any rate) forgot 8 of 8 after one
    restore with the retain terms 4x heavier, retain MA 0.87 -> 0.90, in 104 steps (256 when every
    restore also halved the rate, as before the pressure; 76 with the whole control as it is now).
    With `auto=False` neither the rate nor the pressure changes and the first damage stops the request.
    """

    lr: float
    auto: bool = True
    factor: float = 2.0
    lr_max: float = 5e-2
    lr_min: float = 1e-6
    stall: float = 0.1
    retain_floor: float = 0.96
    max_backoffs: int = 5
    progress_reset: float = 0.25
    patience: int = 5
    pressure_factor: float = 4.0
    near_share: float = 0.25
    backoffs: int = 0  # restores counted towards the stop (since the last progress_reset)
    restores: int = 0  # every restore
    stalled: int = 0
    retain_pressure: float = 1.0  # what the loop multiplies the retain terms' weights by
    pressure_floor: float = 1.0  # relaxing never goes back to a pressure that did damage
    last: str = ""  # the previous update's action
    since_raise: Optional[int] = None  # rounds since the last raise of the rate (None: undone, or none yet)
    gap_start: Optional[float] = None  # the forget set's distance to the target before the first round
    gap_at_backoff: Optional[float] = None  # that distance at the start of the count's first damaging round

    def __post_init__(self) -> None:
        self.lr_ceiling = self.lr_max  # lr_max may fall after damage and climb back up to this

    def near(self, gap: float) -> bool:
        """Within `near_share` of the starting distance to the target: the finishing phase (where the
        loop moves the targets of samples that stay outside, unlearner._Run.retarget)."""
        return self.gap_start is not None and gap < self.near_share * self.gap_start

    def retain_safe(self, retain_ma: Optional[float], retain_ma_before: Optional[float]) -> bool:
        """The retain set is well clear of the floor (half way between it and where it started), or unmeasured."""
        if retain_ma is None or retain_ma_before is None:
            return True
        return retain_ma >= (1 - (1 - self.retain_floor) / 2) * retain_ma_before

    def can_relax(self, retain_ma: Optional[float], retain_ma_before: Optional[float]) -> bool:
        """The retain terms are heavier than any level that did damage and the retain set is safe."""
        return (self.retain_pressure > self.pressure_floor and retain_ma is not None
                and self.retain_safe(retain_ma, retain_ma_before))

    def update(self, gap_before: float, gap_after: float, retain_ma: Optional[float],
               retain_ma_before: Optional[float]) -> str:
        """'keep' | 'escalate' | 'slow' | 'relax' | 'restore' | 'stop' after one round; adjusts self.lr
        and self.retain_pressure."""
        if self.gap_start is None:
            self.gap_start = gap_before
        damaged = (retain_ma is not None and retain_ma_before is not None
                   and retain_ma < self.retain_floor * retain_ma_before)
        stuck = self.auto and gap_before > 0 and (gap_before - gap_after) < self.stall * gap_before  # a stall
        step = math.sqrt(self.pressure_factor)
        if damaged:
            if self.gap_at_backoff is not None and gap_before < (1 - self.progress_reset) * self.gap_at_backoff:
                self.backoffs = 0  # the request got well closer to its target since the count's first restore
            if self.backoffs == 0:
                # progress adds up from the count's first restore, not from the last one: a 32-record request
                # closing in by 5-10% between restores every ~30 steps (NLL 1.96 -> 2.36 over six of them, the
                # band from 3.0) never made a quarter between two and was stopped
                self.gap_at_backoff = gap_before
            self.backoffs += 1
            self.restores += 1
            if not self.auto or self.backoffs > self.max_backoffs or self.lr / self.factor < self.lr_min:
                action = "stop"
            else:
                # damage within `patience` rounds of a raise: the raise is the likely cause. On a
                # 64-record memoriser the retain MA slid 98.7% -> 95.9% of before over the four rounds
                # after a raise; blaming the direction instead put the retain terms at x64, the forget
                # set went back from 2.9 to 1.1 nats and the request stopped on the guard (0/64)
                raised = self.since_raise is not None and self.since_raise < self.patience
                if raised or self.last == "restore" or self.pressure_factor == 1:
                    # a round within `patience` of a raise (undo the raise), or damage again straight after
                    # heavier retain terms, or no pressure to raise: the rate is at fault; halve it and
                    # never climb past it again
                    self.lr /= self.factor
                    self.lr_max = self.lr
                if not raised:
                    self.pressure_floor = max(self.pressure_floor, self.retain_pressure * step)
                    self.retain_pressure *= self.pressure_factor
                self.since_raise = None
                action = "restore"
        elif self.auto and gap_before > 0 and gap_after > (1 + self.stall) * gap_before:
            # the round made things worse: the step overshoots (noise around the target at this rate)
            self.stalled = 0
            self.lr = max(self.lr / self.factor, self.lr_min)
            self.since_raise = None
            action = "slow"
        elif stuck and self.can_relax(retain_ma, retain_ma_before):
            # stuck with the retain set safe: the heavy retain terms are what holds the forget set back
            # (a memoriser's last two samples sat under the band for 300 steps at 4x, retain MA above
            # its value before); lighten them, never below a level that did damage
            self.retain_pressure = max(self.retain_pressure / step, self.pressure_floor)
            action = "relax"
        elif stuck and not self.retain_safe(retain_ma, retain_ma_before):
            # stuck, but the retain set is already sliding towards the floor: a larger step would
            # only get there sooner (64 records of one template: three raises on a retain MA at 91%
            # of before, then three restores and a stop). Hold the rate.
            action = "keep"
        elif stuck:
            self.stalled += 1
            if self.lr >= self.lr_max and self.stalled >= self.patience and self.lr_max < self.lr_ceiling:
                # a ceiling set by one damaging round is not forever: after `patience` stalled rounds
                # without damage below it, try one step above it again
                self.lr_max = min(self.lr_max * self.factor, self.lr_ceiling)
            new = min(self.lr * self.factor, self.lr_max)
            action = "escalate" if new > self.lr else "keep"
            if new > self.lr:
                self.stalled = 0
            self.lr = new
        else:
            self.stalled = 0
            action = "keep"
        if action == "escalate":
            self.since_raise = 0
        elif self.since_raise is not None and action != "restore":
            self.since_raise += 1
        self.last = action
        return action


# ------------------------------------------------------------------------------ the step budget

@dataclass
class StepBudget:
    """How many optimizer steps a request may take (pure bookkeeping; the loop records each round and asks
    at the budget's end whether to go on).

    `base` steps first (ICUConfig.step_budget). With `auto`, a request that reaches them with samples still
    not forgotten, while still closing in on the band, gets `base // 2` more steps, again and again up to
    `max_factor` x `base`. Closing in, over the last `base // 2` steps (the window): more samples forgotten
    than at any round before the window, or the forget set's distance to its target (the loop's `gap`) at
    least `progress` (relative) under its least value before the window. Least values, not the last ones:
    the distance swings from round to round with the loss attack's AUC and the restores. Why a rule and not
    a larger constant: how long a request takes depends on the model and how firmly it holds the text. A
    64-record request of one template (a 4 x 192 Llama, 256 records) ended partial at its 750-step budget
    with 3/64 inside the band and its NLL still rising (2.3 -> 3.0 nats over the last 375 steps, the band
    from 3.75), and forgot 64/64 at 1,500 given by hand; with this rule, 64/64 at 1,125 (one growth). A
    16-record one forgot at 332 of its 450, untouched. A stalled request ends at the budget as before (a
    128-record one stopped on the retain guard at 1,773 of its grown 2,300: more steps do not replace a
    direction that forgets without the kept records).
    """

    base: int
    auto: bool = True
    max_factor: float = 4.0
    progress: float = 0.2
    limit: int = 0  # the steps allowed now (set from base)
    extensions: int = 0
    marks: List[Tuple[int, float, int]] = field(default_factory=list)  # (step, gap, samples forgotten) per round

    def __post_init__(self) -> None:
        self.limit = self.limit or self.base

    @property
    def window(self) -> int:
        return max(1, self.base // 2)

    @property
    def cap(self) -> int:
        return max(self.base, int(self.base * self.max_factor)) if self.auto else self.base

    def record(self, step: int, gap: float, forgotten: int) -> None:
        """A round the run goes on from (not one whose damage was undone)."""
        self.marks.append((step, gap, forgotten))

    def progressing(self) -> bool:
        """Whether the last window closed in on the target (see the class)."""
        start = self.limit - self.window
        before = [m for m in self.marks if m[0] <= start]
        within = [m for m in self.marks if m[0] > start]
        if not before or not within:
            return False
        if max(f for _, _, f in within) > max(f for _, _, f in before):
            return True
        return min(g for _, g, _ in within) < (1 - self.progress) * min(g for _, g, _ in before)

    def extend(self, all_forgotten: bool) -> bool:
        """At the budget's end: whether the request goes on (the limit is raised by a window if so). Never
        when every sample is already forgotten: the extra steps finish forgetting, not centring."""
        if all_forgotten or not self.auto or self.limit >= self.cap or not self.progressing():
            return False
        self.limit = min(self.limit + self.window, self.cap)
        self.extensions += 1
        return True
