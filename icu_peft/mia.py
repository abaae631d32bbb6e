"""Membership inference: can an attacker still tell the forget samples from text the model never saw?

Three reference-free attacks, each a score per sample where higher means "more likely a member":

- loss      (Yeom et al. 2018): the mean token log-likelihood, i.e. minus the loss.
- zlib      (Carlini et al. 2021): minus the loss divided by the zlib-compressed size of the text,
            so text that is merely easy (repetitive, boilerplate) does not look memorised.
- min_k     (Shi et al. 2023, Min-K% Prob): the mean log-likelihood of the k% least likely tokens;
            a memorised text has few surprising tokens.
- min_k_plus_plus (Zhang et al. 2024, Min-K%++): each token's log-likelihood standardised by the
            mean and standard deviation of log p over the vocabulary at that position, then the mean
            of the lowest k%: a memorised token is a local maximum of the distribution.

Beside the AUCs, the metrics that open-unlearning reports under these names: `privleak` (MUSE:
(AUC_unlearned - AUC_oracle) / AUC_oracle, with AUC in open-unlearning's orientation), `forget_quality`
(the p-value of a two-sample KS test between per-sample scores, TOFU-style) and
`extraction_strength` (Carlini et al.: 1 - the shortest prefix fraction after which teacher-forced
greedy decoding reproduces the rest).

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

ATTACKS = ("loss", "zlib", "min_k", "min_k_plus_plus")


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


def min_k_plus_plus_score(token_logprobs: Sequence[float], mu: Sequence[float], sigma: Sequence[float],
                          k: float = 0.2) -> float:
    """Min-K%++: mean of the lowest ceil(k*T) values of (log p(x_t) - mu_t) / sigma_t."""
    z = [(lp - m) / s if s > 0 else 0.0 for lp, m, s in zip(token_logprobs, mu, sigma)]
    return min_k_score(z, k) if z else 0.0


def extraction_strength(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """1 - k/T for the smallest k such that the argmax predictions of tokens k..T-1 all equal the text.

    `predictions[t]` is the argmax for labels[t] (already aligned). 0: even the last token is not
    reproduced; 1: every token is (the whole text comes out from its first token).
    """
    T = len(labels)
    if T == 0:
        return 0.0
    k = T
    while k > 0 and int(predictions[k - 1]) == int(labels[k - 1]):
        k -= 1
    return 1.0 - k / T


def privleak(auc_unlearned: float, auc_oracle: float) -> float:
    """MUSE's PrivLeak in percent: (AUC_unlearned - AUC_oracle) / AUC_oracle * 100.

    AUC here is ours (higher = the attack says "member"); 0 is the target, negative means the
    forget set now looks *less* like members than under a model that never saw it (over-unlearning),
    positive that it still leaks.
    """
    if auc_oracle <= 0:
        raise ValueError("the oracle's AUC must be > 0")
    return (auc_unlearned - auc_oracle) / auc_oracle * 100.0


def forget_quality(forget_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """p-value of a two-sample Kolmogorov-Smirnov test (scipy): high = the two score sets could come
    from one distribution (TOFU's forget quality compares with a retain-only model; without one we
    compare with never-seen text, which is what the forget set should look like)."""
    from scipy.stats import ks_2samp

    if not forget_scores or not reference_scores:
        raise ValueError("forget_quality needs scores on both sides")
    return float(ks_2samp(list(forget_scores), list(reference_scores)).pvalue)


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


def attack_scores(token_logprobs: Sequence[float], compressed_bytes: Optional[int], k: float = 0.2,
                  mu: Optional[Sequence[float]] = None, sigma: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """Every attack's score for one sample; zlib is left out without a compressed size, Min-K%++
    without the per-position mean / std of the log-probs."""
    out = {"loss": loss_score(token_logprobs), "min_k": min_k_score(token_logprobs, k)}
    if compressed_bytes is not None:
        out["zlib"] = zlib_score(token_logprobs, compressed_bytes)
    if mu is not None and sigma is not None:
        out["min_k_plus_plus"] = min_k_plus_plus_score(token_logprobs, mu, sigma, k)
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


@torch.no_grad()
def token_distribution_stats(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int = 16,
                             chunk_size: int = 64) -> List[Tuple[List[float], List[float], List[float]]]:
    """Per sequence: (log p(x_t), mean of log p over the vocabulary under p, its standard deviation) for t = 1..T-1."""
    from .data import pad_batch
    from .metrics import backbone_and_head, model_device

    device = model_device(model)
    parts = backbone_and_head(model)
    out = []
    for b in range(0, len(seqs), batch_size):
        chunk = list(seqs[b:b + batch_size])
        ids, mask = (t.to(device) for t in pad_batch(chunk, pad_id))
        if parts is None:
            hidden, head = model(input_ids=ids, attention_mask=mask).logits, (lambda x: x)
        else:
            hidden, head = parts[0](input_ids=ids, attention_mask=mask).last_hidden_state, parts[1]
        tl, mus, sds = [], [], []
        for s in range(0, ids.shape[1] - 1, chunk_size):
            e = min(s + chunk_size, ids.shape[1] - 1)
            lp = torch.log_softmax(head(hidden[:, s:e]).float(), dim=-1)
            tl.append(lp.gather(-1, ids[:, s + 1:e + 1].unsqueeze(-1)).squeeze(-1))
            # expectations over the vocabulary as dot products, squares in place: two (rows, chunk, vocab)
            # tensors at a time instead of six (1 GB per chunk at a 128k vocabulary and 16 rows)
            p = lp.exp().unsqueeze(-2)
            lp = lp.clamp_(min=-1e4).unsqueeze(-1)
            mu = (p @ lp).squeeze(-1).squeeze(-1)
            var = (p @ lp.square_()).squeeze(-1).squeeze(-1) - mu ** 2
            mus.append(mu)
            sds.append(var.clamp(min=0).sqrt())
        tl_t, mu_t, sd_t = (torch.cat(x, 1).double().cpu() for x in (tl, mus, sds))
        for row, x in enumerate(chunk):
            n = len(x) - 1
            out.append((tl_t[row, :n].tolist(), mu_t[row, :n].tolist(), sd_t[row, :n].tolist()))
    return out


def sample_scores(model, seqs: Sequence[torch.Tensor], pad_id: int, zlib_sizes: Optional[Sequence[int]] = None,
                  k: float = 0.2, batch_size: int = 16) -> List[Dict[str, float]]:
    """Per-sample attack scores under `model`."""
    stats = token_distribution_stats(model, seqs, pad_id, batch_size)
    sizes = list(zlib_sizes) if zlib_sizes is not None else [None] * len(stats)
    return [attack_scores(lp, z, k, mu, sd) for (lp, mu, sd), z in zip(stats, sizes)]


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


__all__ = ["ATTACKS", "zlib_size", "loss_score", "zlib_score", "min_k_score", "min_k_plus_plus_score",
           "extraction_strength", "privleak", "forget_quality", "token_distribution_stats", "roc_auc", "roc_curve", "tpr_at_fpr",
           "attack_scores", "token_logprobs", "sample_scores", "zlib_sizes_of", "membership_inference"]
