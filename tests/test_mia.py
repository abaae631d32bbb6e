"""Membership-inference attacks and ROC-AUC on constructed score sets and on the tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from icu_peft.mia import (attack_scores, loss_score, membership_inference, min_k_score, roc_auc, roc_curve,
                          tpr_at_fpr, zlib_score, zlib_size)


def test_auc_of_identical_score_sets_is_one_half():
    scores = [0.3, -1.2, 4.0, 0.3, 2.5]
    assert roc_auc(scores, list(scores)) == 0.5
    assert roc_auc([1.0] * 4, [1.0] * 7) == 0.5


def test_auc_of_separated_and_reversed_sets():
    assert roc_auc([5, 6, 7], [1, 2]) == 1.0
    assert roc_auc([1, 2], [5, 6, 7]) == 0.0
    # one member below one non-member, out of 2 * 2 pairs; a tie counts one half
    assert roc_auc([3, 1], [2, 0]) == pytest.approx(3 / 4)
    assert roc_auc([2, 5], [2, 0]) == pytest.approx((0.5 + 1 + 1 + 1) / 4)


def test_auc_matches_a_pairwise_count():
    rng = random.Random(0)
    a = [round(rng.gauss(0.5, 1), 1) for _ in range(40)]  # rounding makes ties
    b = [round(rng.gauss(0, 1), 1) for _ in range(30)]
    pairs = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)
    assert roc_auc(a, b) == pytest.approx(pairs / (len(a) * len(b)))


def test_auc_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = random.Random(1)
    a = [round(rng.random(), 2) for _ in range(25)]
    b = [round(rng.random() * 0.8, 2) for _ in range(35)]
    assert roc_auc(a, b) == pytest.approx(sk.roc_auc_score([1] * 25 + [0] * 35, a + b))


def test_auc_needs_both_sets():
    with pytest.raises(ValueError):
        roc_auc([], [1.0])


def test_roc_curve_and_tpr_at_fpr():
    fpr, tpr = roc_curve([3, 4], [1, 2])
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert all(x <= y for x, y in zip(fpr, fpr[1:])) and all(x <= y for x, y in zip(tpr, tpr[1:]))
    assert tpr_at_fpr([3, 4], [1, 2], 0.0) == 1.0
    assert tpr_at_fpr([1, 2], [3, 4], 0.4) == 0.0


def test_attack_scores():
    lp = [-0.1, -3.0, -0.2, -0.5, -2.0]
    assert loss_score(lp) == pytest.approx(-5.8 / 5)
    assert min_k_score(lp, 0.2) == -3.0  # ceil(0.2 * 5) = 1 lowest
    assert min_k_score(lp, 0.4) == pytest.approx(-2.5)
    assert min_k_score(lp, 1.0) == pytest.approx(loss_score(lp))
    with pytest.raises(ValueError):
        min_k_score(lp, 0.0)
    # same loss, less compressible text -> looks more like a member
    assert zlib_score(lp, 200) > zlib_score(lp, 50)
    assert zlib_size("ab" * 200) < zlib_size("".join(chr(33 + (i * 37) % 90) for i in range(400)))
    assert set(attack_scores(lp, None)) == {"loss", "min_k"}
    assert set(attack_scores(lp, 40)) == {"loss", "min_k", "zlib"}


def test_membership_inference_on_the_tiny_model(tiny_model_dir, tiny_corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from icu_peft.mia import zlib_sizes_of

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    mem = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["forget"] + tiny_corpus["retain"][:4]]
    non = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["unseen"]]
    res = membership_inference(model, mem, non, tok.pad_token_id, zlib_sizes_of(tok, mem), zlib_sizes_of(tok, non))
    assert set(res) == {"loss", "zlib", "min_k", "min_k_plus_plus"}
    for r in res.values():  # memorised vs never seen: every attack separates them
        assert r["auc"] > 0.9
        assert len(r["members"]) == len(mem) and len(r["non_members"]) == len(non)
    same = membership_inference(model, mem, mem, tok.pad_token_id)
    assert all(r["auc"] == 0.5 for r in same.values())


def test_privacy_metrics_by_hand():
    from icu_peft.mia import extraction_strength, forget_quality, min_k_plus_plus_score, privleak

    # Min-K%++: standardise, then the mean of the lowest 50%
    assert min_k_plus_plus_score([-1.0, -3.0], [-2.0, -2.0], [1.0, 2.0], k=0.5) == pytest.approx(-0.5)
    # extraction strength: the last 2 of 4 tokens come out -> 1 - 2/4
    assert extraction_strength([9, 9, 3, 4], [1, 2, 3, 4]) == 0.5
    assert extraction_strength([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0 and extraction_strength([0], [1]) == 0.0
    # PrivLeak (MUSE): (0.6 - 0.5) / 0.5
    assert privleak(0.6, 0.5) == pytest.approx(20.0) and privleak(0.25, 0.5) == pytest.approx(-50.0)
    # KS: identical samples -> p = 1; disjoint ones -> small p
    assert forget_quality([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert forget_quality([10.0, 11, 12, 13, 14, 15], [1.0, 2, 3, 4, 5, 6]) < 0.01
