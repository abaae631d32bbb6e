"""Membership inference: can an attacker still tell the forget samples from text the model never saw?

Three reference-free attacks, each a score per sample where higher means "more likely a member":

- loss      (Yeom et al. 2018): the mean token log-likelihood, i.e. minus the loss.
- zlib      (Carlini et al. 2021): minus the loss divided by the zlib-compressed size of the text,
            so text that is merely easy (repetitive, boilerplate) does not look memorised.
- min_k     (Shi et al. 2023, Min-K% Prob): the mean log-likelihood of the k% least likely tokens;
            a memorised text has few surprising tokens.

`roc_auc(members, non_members)` is the probability that a random member outscores a random
non-member: 1.0 = the attacker separates them perfectly, 0.5 = indistinguishable (the target after
forgetting), below 0.5 = the forget samples now look *less* familiar than unseen text, which is
itself a signal that something was removed (the "Streisand effect" of over-forgetting).
"""

from __future__ import annotations

import math
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .metrics import teacher_forced

ATTACKS = ("loss", "zlib", "min_k")


# ------------------------------------------------------------------------------ pure functions

def zlib_size(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (Carlini et al.'s 'zlib entropy')."""
    return len(zlib.compress(text.encode("utf-8")))


def loss_score(token_logprobs: Sequence[float]) -> float:
    """Mean log-likelihood of the tokens (= minus the mean NLL)."""
    lp = list(token_logprobs)
    return sum(lp) / len(lp) if lp else 0.0


def zlib_score(token_logprobs: Sequence[float], compressed_bytes: int) -> float:
    """Minus the mean NLL over the zlib size of the text: the mean NLL is scaled by how
    compressible the text is, so generic text and memorised text separate."""
    return loss_score(token_logprobs) / max(1, compressed_bytes)


def min_k_score(token_logprobs: Sequence[float], k: float = 0.2) -> float:
    """Mean of the lowest ceil(k * T) token log-likelihoods (Min-K% Prob)."""
    if not 0 < k <= 1:
        raise ValueError("k must be in (0, 1]")
    lp = sorted(token_logprobs)
    if not lp:
        return 0.0
    m = max(1, math.ceil(k * len(lp)))
    return sum(lp[:m]) / m


def roc_auc(members: Sequence[float], non_members: Sequence[float]) -> float:
    """ROC-AUC of separating members (positives) from non-members by score; ties count one half.

    The Mann-Whitney U statistic over both sets, O((m+n) log(m+n)).
    """
    if not members or not non_members:
        raise ValueError("roc_auc needs at least one member and one non-member score")
    scored = sorted([(float(s), 1) for s in members] + [(float(s), 0) for s in non_members])
    # average ranks (1-based) over ties
    ranks = [0.0] * len(scored)
    i = 0
    while i < len(scored):
        j = i
        while j + 1 < len(scored) and scored[j + 1][0] == scored[i][0]:
            j += 1
        r = (i + j) / 2 + 1
        for k in range(i, j + 1):
            ranks[k] = r
        i = j + 1
    m, n = len(members), len(non_members)
    rank_sum = sum(r for r, (_, pos) in zip(ranks, scored) if pos)
    return (rank_sum - m * (m + 1) / 2) / (m * n)


def roc_curve(members: Sequence[float], non_members: Sequence[float]) -> Tuple[List[float], List[float]]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1)."""
    m, n = len(members), len(non_members)
    if not m or not n:
        raise ValueError("roc_curve needs at least one member and one non-member score")
    thresholds = sorted(set(float(s) for s in list(members) + list(non_members)), reverse=True)
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        tpr.append(sum(s >= t for s in members) / m)
        fpr.append(sum(s >= t for s in non_members) / n)
    return fpr, tpr


def tpr_at_fpr(members: Sequence[float], non_members: Sequence[float], max_fpr: float = 0.05) -> float:
    """Highest true positive rate at a false positive rate <= max_fpr (the low-FPR view of an attack)."""
    fpr, tpr = roc_curve(members, non_members)
    return max(t for f, t in zip(fpr, tpr) if f <= max_fpr + 1e-12)


def attack_scores(token_logprobs: Sequence[float], compressed_bytes: Optional[int], k: float = 0.2) -> Dict[str, float]:
    """Every attack's score for one sample; zlib is left out without a compressed size."""
    out = {"loss": loss_score(token_logprobs), "min_k": min_k_score(token_logprobs, k)}
    if compressed_bytes is not None:
        out["zlib"] = zlib_score(token_logprobs, compressed_bytes)
    return out


# ------------------------------------------------------------------------------ model access

@torch.no_grad()
def token_logprobs(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int = 16) -> List[List[float]]:
    """log p(x_t | x_<t) for t = 1..T-1 of every sequence (one teacher-forced pass per batch)."""
    out: List[List[float]] = []
    for s in range(0, len(seqs), batch_size):
        chunk = list(seqs[s:s + batch_size])
        tf = teacher_forced(model, chunk, pad_id)
        for row, x in enumerate(chunk):
            out.append(tf.target_logprobs[row, : len(x) - 1].double().tolist())
    return out


def sample_scores(model, seqs: Sequence[torch.Tensor], pad_id: int, zlib_sizes: Optional[Sequence[int]] = None,
                  k: float = 0.2, batch_size: int = 16) -> List[Dict[str, float]]:
    """Per-sample attack scores under `model`."""
    lps = token_logprobs(model, seqs, pad_id, batch_size)
    sizes = list(zlib_sizes) if zlib_sizes is not None else [None] * len(lps)
    return [attack_scores(lp, z, k) for lp, z in zip(lps, sizes)]


def zlib_sizes_of(tokenizer, seqs: Sequence[torch.Tensor]) -> List[int]:
    """zlib sizes of the texts the model actually scored (after truncation), decoded from the ids."""
    return [zlib_size(tokenizer.decode(x.tolist(), skip_special_tokens=True)) for x in seqs]


def membership_inference(model, member_seqs: Sequence[torch.Tensor], non_member_seqs: Sequence[torch.Tensor],
                         pad_id: int, member_zlib: Optional[Sequence[int]] = None,
                         non_member_zlib: Optional[Sequence[int]] = None, k: float = 0.2,
                         batch_size: int = 16) -> Dict[str, dict]:
    """Every attack's AUC (and TPR at 5% FPR) for members (e.g. the forget set) vs non-members.

    Returns {attack: {"auc", "tpr_at_5fpr", "members": [scores], "non_members": [scores]}}; the
    score lists are numbers only and feed the ROC plot of the report.
    """
    mem = sample_scores(model, member_seqs, pad_id, member_zlib, k, batch_size)
    non = sample_scores(model, non_member_seqs, pad_id, non_member_zlib, k, batch_size)
    out = {}
    for attack in ATTACKS:
        if attack not in mem[0] or attack not in non[0]:
            continue
        a, b = [r[attack] for r in mem], [r[attack] for r in non]
        out[attack] = {"auc": roc_auc(a, b), "tpr_at_5fpr": tpr_at_fpr(a, b, 0.05), "members": a, "non_members": b}
    return out


__all__ = ["ATTACKS", "zlib_size", "loss_score", "zlib_score", "min_k_score", "roc_auc", "roc_curve", "tpr_at_fpr",
           "attack_scores", "token_logprobs", "sample_scores", "zlib_sizes_of", "membership_inference"]
