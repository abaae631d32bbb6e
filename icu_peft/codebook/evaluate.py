"""Token-level NLL, perplexity and MA of a model (with or without a codebook) on a set of sequences."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch

from ..metrics import teacher_forced


def windows(tokenizer, texts: Sequence[str], max_length: int, min_tokens: int = 8) -> List[torch.Tensor]:
    """Token windows of at most `max_length` tokens: long texts are cut, not truncated away."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        for s in range(0, len(ids), max_length):
            w = ids[s:s + max_length]
            if len(w) >= min_tokens:
                out.append(torch.tensor(w, dtype=torch.long))
    return out


def truncated(tokenizer, texts: Sequence[str], max_length: int) -> List[torch.Tensor]:
    """One sequence per text (first `max_length` tokens): per-sample scores stay per sample."""
    return [torch.tensor(tokenizer(t, add_special_tokens=True)["input_ids"][:max_length], dtype=torch.long)
            for t in texts]


@torch.no_grad()
def lm_scores(model, seqs: Sequence[torch.Tensor], pad_id: int, batch_size: int = 8) -> Dict[str, float]:
    """Token-weighted mean NLL, perplexity and MA (next-token accuracy) over `seqs`, plus per-sample MA."""
    total, count, hits = 0.0, 0, 0
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # less padding
    res_ma, res_nll = [0.0] * len(seqs), [0.0] * len(seqs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        tf = teacher_forced(model, [seqs[i] for i in idx], pad_id)
        v = tf.valid
        nll = -(tf.target_logprobs * v)
        hit = (tf.predictions[:, :-1] == tf.labels[:, 1:]) & v
        total += float(nll.sum())
        count += int(v.sum())
        hits += int(hit.sum())
        for row, i in enumerate(idx):
            n = max(int(v[row].sum()), 1)
            res_nll[i] = float(nll[row].sum()) / n
            res_ma[i] = float(hit[row].sum()) / n
    mean_nll = total / max(count, 1)
    return {"nll": mean_nll, "ppl": math.exp(min(mean_nll, 50.0)), "ma": hits / max(count, 1), "tokens": count,
            "per_sample_ma": res_ma, "per_sample_nll": res_nll}
