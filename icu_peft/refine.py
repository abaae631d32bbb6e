"""IUR (Iterative Unlearning Refinement): which forget samples count as forgotten.

A sample is forgotten when the model scores it no higher than text of the same kind it never saw.
Forgotten samples (and their neighbours) leave the active set; scores are recomputed after every
epoch, so a sample whose memory comes back re-enters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Optional

from .metrics import Scores


@dataclass
class Thresholds:
    """The 'forgotten' line: mean MA / EL_n on unseen text (or given values), and ICU's BLEU cut."""

    ma: float
    el: float
    bleu: float = 0.01
    source: str = "default"  # unseen | config | default
    unseen_count: Optional[int] = None
    nll: Optional[float] = None  # the level a forget sample's mean NLL is held near (config.nll_target); None: off

    def to_dict(self) -> dict:
        return asdict(self)


def is_forgotten(ma: float, el: float, thresholds: Thresholds, bleu: Optional[float] = None,
                 criterion: str = "ma_el") -> bool:
    """ma_el: MA and EL_n at or below their thresholds. bleu: generated-suffix BLEU below the cut."""
    if criterion == "bleu":
        if bleu is None:
            raise ValueError("criterion 'bleu' needs BLEU scores")
        return bleu < thresholds.bleu
    # el is None when lazy scoring skipped it, which it does only where MA already fails
    return ma <= thresholds.ma and el is not None and el <= thresholds.el


def forgotten_mask(scores: Scores, thresholds: Thresholds, criterion: str = "ma_el") -> List[bool]:
    bleu = scores.bleu if scores.bleu is not None else [None] * len(scores.ma)
    return [is_forgotten(m, e, thresholds, b, criterion) for m, e, b in zip(scores.ma, scores.el, bleu)]
