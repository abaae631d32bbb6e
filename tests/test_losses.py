"""The loss terms on hand-made logits, and the chunked forms against the plain ones."""

import math

import pytest
import torch
import torch.nn.functional as F

from icu_peft.losses import (chunked_kl_to_reference, chunked_retain_terms, chunked_sequence_logprob,
                             chunked_target_bce, chunked_token_nll, icu_loss, kl_to_reference, linear_head, npo_loss,
                             per_sample_nll, reference_anchor, token_nll)
from icu_peft.lowp import FrozenBf16Matmuls


def test_token_nll_matches_hand_computation_and_ignores_padding():
    # vocab 3; sample 0 has 3 real tokens, sample 1 has 2 real + 1 pad
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 9.0]],
                           [[0.0, 0.0, 2.0], [5.0, 5.0, 5.0], [9.0, 9.0, -9.0]]])
    labels = torch.tensor([[0, 1, 2], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    lse = math.log(math.exp(2) + 2)
    # targets: s0: pos0->1 (logit 0), pos1->2 (logit 0); s1: pos0->0 (logit 0); pad target excluded
    expected = ((lse - 0) + (lse - 0) + (lse - 0)) / 3
    assert token_nll(logits, labels, mask).item() == pytest.approx(expected, rel=1e-6)
    # changing the logits at the padded position changes nothing
    logits2 = logits.clone()
    logits2[1, 1] = torch.tensor([100.0, -100.0, 0.0])
    assert token_nll(logits2, labels, mask).item() == pytest.approx(expected, rel=1e-6)
    ps = per_sample_nll(logits, labels, mask)
    assert ps[0].item() == pytest.approx(lse, rel=1e-6) and ps[1].item() == pytest.approx(lse, rel=1e-6)


def test_kl_is_zero_for_identical_and_positive_otherwise():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.long)
    assert kl_to_reference(ref, ref.clone(), mask).item() == pytest.approx(0.0, abs=1e-6)
    other = ref + torch.randn(2, 5, 7)
    kl = kl_to_reference(ref, other, mask).item()
    # independent computation with torch's kl_div on the positions that predict a real token
    expect = F.kl_div(F.log_softmax(other[:, :-1], -1), F.log_softmax(ref[:, :-1], -1), log_target=True,
                      reduction="none").sum(-1).mean().item()
    assert kl == pytest.approx(expect, rel=1e-5) and kl > 0


def test_icu_loss_signs_and_weights():
    one = torch.tensor(1.0)
    assert icu_loss(one * 2, one * 3, one * 5, u=1.0, a=0.5, b=1.0).item() == pytest.approx(-2 + 1.5 + 5)
    assert icu_loss(one * 2, one * 3, one * 5, u=0.0, a=0.0, b=0.0).item() == 0.0


def test_npo_matches_formula_and_is_bounded_by_ga_gradient():
    logp = torch.tensor([-1.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0])
    beta = 0.1
    loss = npo_loss(logp, ref, beta)
    expect = (2 / beta) * torch.log1p(torch.exp(beta * (logp.detach() - ref))).mean()
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    loss.backward()
    # gradient pushes log-likelihood down, and fades for the sample already far below the reference
    assert (logp.grad > 0).all() and logp.grad[1] < logp.grad[0]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_forms_equal_plain_forms_and_their_gradients(chunk):
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    ref_hidden = torch.randn(3, 6, 8)
    labels = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])

    s, c = chunked_token_nll(hidden, head, labels, mask, chunk)
    plain = token_nll(head(hidden), labels, mask)
    assert (s / c).item() == pytest.approx(plain.item(), rel=1e-5)
    g1, = torch.autograd.grad(s / c, hidden)
    g2, = torch.autograd.grad(plain, hidden)
    assert torch.allclose(g1, g2, atol=1e-6)

    s, c = chunked_kl_to_reference(hidden, ref_hidden, head, mask, chunk)
    plain = kl_to_reference(head(ref_hidden), head(hidden), mask)
    assert (s / c).item() == pytest.approx(plain.item(), rel=1e-5)

    lp = chunked_sequence_logprob(hidden, head, labels, mask, chunk)
    assert torch.allclose(lp, -per_sample_nll(head(hidden), labels, mask) * (mask[:, 1:] * mask[:, :-1]).sum(1), atol=1e-5)


def _frozen_head(vocab=11, width=8):
    head = torch.nn.Linear(width, vocab, bias=True)
    head.requires_grad_(False)
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    return head, calls


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 3.0), (0.0, 2.0), (1.0, 0.0)])
def test_the_retain_terms_in_one_pass_equal_the_two_plain_terms_and_their_gradients(chunk, weights):
    torch.manual_seed(2)
    a, b = weights
    head, calls = _frozen_head()
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    ref_hidden = torch.randn(3, 6, 8)
    labels = torch.randint(0, 11, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])

    total, s_nll, s_kl = chunked_retain_terms(hidden, ref_hidden if b else None, head, labels, mask, a, b, chunk)
    count = (mask[:, 1:] * mask[:, :-1]).sum()
    plain_nll = token_nll(head(hidden), labels, mask) * count
    plain_kl = kl_to_reference(head(ref_hidden), head(hidden), mask) * count
    assert s_nll.item() == pytest.approx(plain_nll.item() if a else 0.0, rel=1e-5, abs=1e-6)
    assert s_kl.item() == pytest.approx(plain_kl.item() if b else 0.0, rel=1e-5, abs=1e-6)
    plain = a * plain_nll + b * plain_kl
    assert total.item() == pytest.approx(plain.item(), rel=1e-5)
    g1, = torch.autograd.grad(3.0 * total, hidden)  # backward scales the gradient taken in the forward pass
    g2, = torch.autograd.grad(3.0 * plain, hidden)
    assert torch.allclose(g1, g2, atol=1e-5)
    assert not s_nll.requires_grad and not s_kl.requires_grad


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.5, 3.0), (0.0, 2.0)])
def test_the_kl_from_the_reference_anchor_equals_the_kl_from_its_logits(chunk, weights):
    # lse(z) - lse_ref - r . (h - h_ref) with r = W^T p_ref: the same KL and gradient without the reference's
    # logits (a head with a bias too: it cancels in z - z_ref)
    torch.manual_seed(5)
    a, b = weights
    head, _ = _frozen_head()
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    ref_hidden = hidden.detach() + 0.5 * torch.randn(3, 7, 8)
    labels = torch.randint(0, 11, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5])
    plain = chunked_retain_terms(hidden, ref_hidden, head, labels, mask, a, b, chunk)
    anchored = chunked_retain_terms(hidden, ref_hidden, head, labels, mask, a, b, chunk,
                                    reference_anchor(head, ref_hidden, chunk_size=3))
    for x, y in zip(plain, anchored):
        assert y.item() == pytest.approx(x.item(), rel=1e-5, abs=1e-5)
    g1, = torch.autograd.grad(plain[0], hidden)
    g2, = torch.autograd.grad(anchored[0], hidden)
    assert torch.allclose(g1, g2, atol=1e-5)
    # the hand formula on one position
    lse = torch.logsumexp(head(hidden[0, 2]), -1)
    p_ref = torch.softmax(head(ref_hidden[0, 2]), -1)
    kl = (p_ref * (torch.log(p_ref) - torch.log_softmax(head(hidden[0, 2]), -1))).sum()
    r, lse_ref = reference_anchor(head, ref_hidden[0, 2:3])
    assert float(lse - lse_ref[0] - r[0] @ (hidden[0, 2] - ref_hidden[0, 2])) == pytest.approx(float(kl), abs=1e-5)


def test_the_anchored_kl_at_the_reference_is_zero_under_bf16_products():
    # the anchor's lse is taken as the step takes the head: under the bf16 mode the KL of the reference
    # against itself cancels exactly where each side alone carries bf16 rounding
    torch.manual_seed(6)
    head = torch.nn.Linear(64, 300).requires_grad_(False)
    h = 3 * torch.randn(2, 5, 64)
    labels, mask = torch.randint(0, 300, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    with FrozenBf16Matmuls(torch.bfloat16):
        anchor = reference_anchor(head, h)
        _, _, kl = chunked_retain_terms(h.clone().requires_grad_(True), h, head, labels, mask, 1.0, 1.0, 4, anchor)
    assert kl.item() == pytest.approx(0.0, abs=1e-5)
    assert linear_head(head) and not linear_head(torch.nn.Sequential(head)) and not linear_head(lambda x: x)


def test_a_frozen_head_runs_once_per_chunk_and_the_gradient_matches_the_checkpointed_path():
    torch.manual_seed(3)
    head, calls = _frozen_head()
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    ref_hidden = torch.randn(2, 9, 8)
    labels = torch.randint(0, 11, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    chunks = 3  # 8 targets in chunks of 3
    total, _, _ = chunked_retain_terms(hidden, ref_hidden, head, labels, mask, 1.0, 1.0, 3)
    total.backward()
    # one head product for the model and one for the reference per chunk: nothing recomputed in backward
    assert len(calls) == 2 * chunks
    eager = hidden.grad.clone()

    hidden.grad = None
    trainable = torch.nn.Linear(8, 11, bias=True)  # the same head, trainable: the checkpointed path
    trainable.load_state_dict(head.state_dict())
    again, _, _ = chunked_retain_terms(hidden, ref_hidden, trainable, labels, mask, 1.0, 1.0, 3)
    again.backward()
    assert again.item() == pytest.approx(total.item(), rel=1e-6)
    assert torch.allclose(hidden.grad, eager, atol=1e-6)
    assert trainable.weight.grad is not None  # a trainable head still gets its gradient

    # the calibrated forget term takes the same path
    hidden.grad, calls[:] = None, []
    target = torch.full((2, 9), -2.0)
    s, _ = chunked_target_bce(hidden, head, labels, mask, target, 3, 0.3)
    s.backward()
    assert len(calls) == chunks
    g_eager = hidden.grad.clone()
    hidden.grad = None
    s2, _ = chunked_target_bce(hidden, trainable, labels, mask, target, 3, 0.3)
    s2.backward()
    assert torch.allclose(hidden.grad, g_eager, atol=1e-6)


def test_the_gradient_taken_in_the_forward_pass_keeps_the_bf16_products():
    torch.manual_seed(4)
    head, _ = _frozen_head(vocab=64, width=32)
    hidden = torch.randn(2, 7, 32, requires_grad=True)
    ref_hidden = torch.randn(2, 7, 32)
    labels = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with FrozenBf16Matmuls():
        total, _, _ = chunked_retain_terms(hidden, ref_hidden, head, labels, mask, 1.0, 1.0, 4)
        low = head(hidden)
    assert low.dtype == torch.float32 and not torch.equal(low, head(hidden))  # the mode did compute in bf16
    total.backward()
    exact, _, _ = chunked_retain_terms(hidden.detach().requires_grad_(True), ref_hidden, head, labels, mask, 1.0, 1.0, 4)
    assert total.item() == pytest.approx(exact.item(), rel=2e-2)
    assert torch.isfinite(hidden.grad).all() and hidden.grad.abs().sum() > 0


def test_only_predicted_counts_only_tokens_still_produced():
    head = torch.nn.Identity()
    # vocab 3: position 0 predicts token 1 (argmax 1 = target), position 1 predicts token 0 (argmax 2 != 0)
    hidden = torch.tensor([[[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    labels = torch.tensor([[0, 1, 0]])
    mask = torch.ones(1, 3, dtype=torch.long)
    s_all, c_all = chunked_token_nll(hidden, head, labels, mask)
    s_pred, c_pred = chunked_token_nll(hidden, head, labels, mask, only_predicted=True)
    assert c_all.item() == 2 and c_pred.item() == 1
    assert s_pred.item() < s_all.item()


def test_distinct_token_mask_drops_targets_whose_ngram_is_shared():
    from icu_peft.losses import distinct_token_mask, ngram_set

    retain = [[1, 2, 3, 4, 5], [9, 9, 9]]
    shared = ngram_set(retain, 3)
    assert (1,) in shared and (1, 2) in shared and (2, 3, 4) in shared and (1, 2, 3, 4) not in shared
    # targets: 2 ([1,2] shared), 3 ([1,2,3] shared), 7 ([2,3,7] new), 4 ([3,7,4] new), 5 ([7,4,5] new)
    m = distinct_token_mask([1, 2, 3, 7, 4, 5], shared, 3)
    assert m.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert distinct_token_mask([8, 8], set(), 3).tolist() == [0.0, 1.0]  # nothing shared: every target


def test_token_weights_restrict_the_nll_and_its_gradient():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 7, bias=False)
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    labels = torch.randint(0, 7, (1, 5))
    mask = torch.ones(1, 5, dtype=torch.long)
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0, 1.0]])  # targets at positions 1 and 4 only
    s, c = chunked_token_nll(hidden, head, labels, mask, 2, weights=w)
    logp = torch.log_softmax(head(hidden), -1)[0]
    manual = -(logp[0, labels[0, 1]] + logp[3, labels[0, 4]])
    assert c.item() == 2 and s.item() == pytest.approx(manual.item(), rel=1e-5)
    g, = torch.autograd.grad(s, hidden)
    assert g[0, 1].abs().sum() == 0 and g[0, 2].abs().sum() == 0  # hidden states of dropped targets get no gradient
    assert g[0, 0].abs().sum() > 0 and g[0, 3].abs().sum() > 0


def test_shared_context_counts_how_long_a_context_the_kept_text_shares():
    from icu_peft.losses import ngram_set, shared_context
    kept = [[1, 2, 3, 4], [9, 3, 4]]
    pool = [ngram_set(kept, n) for n in (1, 2, 3)]
    # targets 2, 3, 7, 4: (1,2) and (1,2,3) are kept text; 7 is nowhere; (7,4) is not, but 4 is
    assert shared_context([1, 2, 3, 7, 4], pool).tolist() == [2.0, 3.0, 0.0, 1.0]
    assert shared_context([5, 6], pool).tolist() == [0.0]



def test_entropy_error_is_two_sided_and_adds_to_the_target_loss():
    import math

    import torch

    from icu_peft.losses import chunked_target_bce, entropy_error

    uniform = torch.log(torch.full((1, 4), 0.25))
    assert math.isclose(float(entropy_error(uniform, torch.tensor([1.0]))), (math.log(4) - 1.0) ** 2, rel_tol=1e-6)
    assert math.isclose(float(entropy_error(uniform, torch.tensor([2.0]))), (2.0 - math.log(4)) ** 2, rel_tol=1e-6)
    assert float(entropy_error(uniform, torch.tensor([math.log(4)]))) < 1e-10
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones(2, 5)
    mask[1, 4] = 0  # a padded position pays nothing
    target = torch.full((2, 5), -2.0)
    ent = torch.rand(2, 5) * 2  # aligned with the labels: position t holds token t's target
    plain, n = chunked_target_bce(hidden, head, ids, mask, target, chunk_size=2)
    held, _ = chunked_target_bce(hidden, head, ids, mask, target, chunk_size=2, target_entropy=ent, entropy_weight=0.5)
    with torch.no_grad():
        lp = torch.log_softmax(head(hidden[:, :-1]), -1)
    err = entropy_error(lp, ent[:, 1:]) * mask[:, 1:]
    assert torch.isclose(held - plain, 0.5 * err.sum(), atol=1e-5)
    assert n == 7
