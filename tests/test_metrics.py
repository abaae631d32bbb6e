"""MA, EL_n, perplexity and secret extraction on models whose answer is known."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from icu_peft.metrics import (extraction_likelihood, greedy_continue, ngram_overlap, perplexity, perplexity_from_nll,
                              score_samples, secret_extraction, secret_in_text, secret_token_accuracy,
                              sliding_windows, split_secret_tokens, teacher_forced)


class RuleModel(torch.nn.Module):
    """A causal LM that follows a fixed rule: next token = (token + 1) % V with logit `gap`,
    or, with gap=0, the same logit for every token (a uniform model).

    On sequences that follow the rule it puts (almost) all mass on the true next token.
    """

    def __init__(self, vocab: int, gap: float):
        super().__init__()
        self.vocab, self.gap = vocab, gap
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=512, vocab_size=vocab)

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None,
                logits_to_keep=None, **kw):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        if self.gap:
            logits.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.gap)
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=None)


def rule_sequences(n: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (1,), generator=g) + torch.arange(length)) % vocab for _ in range(n)]


def random_sequences(n: int, length: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------ constructed models

def test_copying_model_has_ma_and_el_one():
    V = 17
    seqs = rule_sequences(6, 30, V) + rule_sequences(3, 21, V, seed=1)  # mixed lengths: padding paths too
    s = score_samples(RuleModel(V, 50.0), seqs, pad_id=0, el_n=5, batch_size=4)
    assert s.ma == pytest.approx([1.0] * len(seqs))
    assert s.el == pytest.approx([1.0] * len(seqs))


def test_uniform_model_has_ma_near_one_over_v_and_perplexity_v():
    V = 10
    seqs = random_sequences(40, 51, V, seed=3)
    model = RuleModel(V, 0.0)
    ma = teacher_forced(model, seqs, pad_id=0).ma()
    assert float(ma.mean()) == pytest.approx(1 / V, abs=0.03)  # 2000 tokens: sd ~ 0.007
    p = perplexity(model, seqs, pad_id=0, window=16, stride=8)
    assert p.corpus == pytest.approx(V, rel=1e-5)
    assert p.per_sample == pytest.approx([V] * len(seqs), rel=1e-5)


def test_copying_model_has_perplexity_one_whatever_the_window():
    V = 13
    seqs = rule_sequences(4, 40, V)
    model = RuleModel(V, 40.0)
    for window, stride in ((64, 32), (8, 4), (8, 8), (5, 1)):
        assert perplexity(model, seqs, 0, window=window, stride=stride).corpus == pytest.approx(1.0, abs=1e-6)


def test_perplexity_from_nll():
    assert perplexity_from_nll(0.0, 5) == 1.0
    assert perplexity_from_nll(5 * math.log(7), 5) == pytest.approx(7.0)
    assert perplexity_from_nll(1.0, 0) == float("inf")


@pytest.mark.parametrize("length", [2, 3, 7, 16, 17, 50])
@pytest.mark.parametrize("window,stride", [(2, 1), (4, 2), (4, 4), (8, 3), (16, 16), (64, 32)])
def test_sliding_windows_score_every_token_once(length, window, stride):
    scored = []
    for begin, end, first in sliding_windows(length, window, stride):
        assert end - begin <= window
        assert begin < first <= end  # at least one token of context
        scored += range(first, end)
    assert scored == list(range(1, length))


def test_sliding_windows_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sliding_windows(10, 1, 1)
    with pytest.raises(ValueError):
        sliding_windows(10, 4, 5)


# ------------------------------------------------------------------------------ the tiny trained model

@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tok


def _ids(tok, text):
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


@torch.no_grad()
def naive_greedy(model, prefix: torch.Tensor, steps: int):
    """Greedy decoding of one prefix, unbatched and unpadded: the textbook loop on HF's own cache."""
    from icu_peft.metrics import _cache_arg, _out_cache

    out = model(input_ids=prefix[None], use_cache=True)
    gen = [int(out.logits[0, -1].argmax())]
    for _ in range(steps - 1):
        out = model(input_ids=torch.tensor([[gen[-1]]]), use_cache=True, **{_cache_arg(model): _out_cache(out)})
        gen.append(int(out.logits[0, -1].argmax()))
    return gen


def naive_el(x: torch.Tensor, continuations: dict, n: int, start: int = 1) -> float:
    """EL_n straight from the definition, given the fresh roll-out of every prefix length t."""
    T = len(x)
    scores = [ngram_overlap(continuations[t], x[t:].tolist(), n) for t in range(max(start, 1), T - n + 1)]
    return sum(scores) / len(scores) if scores else 0.0


@pytest.fixture(scope="module")
def rollouts(tiny, tiny_corpus):
    """A memorised sample (few deviations) and an unseen one (deviations everywhere), each with the
    naive greedy roll-out of every prefix: shared by the EL tests, the expensive part."""
    model, tok = tiny
    seqs = [_ids(tok, tiny_corpus["forget"][0]), _ids(tok, tiny_corpus["unseen"][0])]
    return seqs, [{t: naive_greedy(model, x[:t], len(x) - t) for t in range(1, len(x))} for x in seqs]


def test_memoised_el_equals_naive_el(tiny, rollouts):
    """The splicing shortcut of extraction_likelihood must give the definition's value exactly."""
    model, tok = tiny
    seqs, conts = rollouts
    for n, start in ((10, 1), (4, 1), (10, 20)):
        fast = extraction_likelihood(model, seqs, n, tok.pad_token_id, start=start, batch_size=3)
        slow = [naive_el(x, c, n, start) for x, c in zip(seqs, conts)]
        assert fast == pytest.approx(slow, abs=1e-9), (n, start)
    # and the measure tells the two kinds apart, else this test would prove little
    assert fast[0] > 0.5 > fast[1]


def test_el_tail_variant_scores_only_late_prefixes(tiny, rollouts):
    model, tok = tiny
    (x, _), (c, _) = rollouts
    T = len(x)
    assert extraction_likelihood(model, [x], 10, tok.pad_token_id, start=T - 12) == pytest.approx(
        [naive_el(x, c, 10, T - 12)])
    assert extraction_likelihood(model, [x], 10, tok.pad_token_id, start=T) == [0.0]  # nothing to score


def _random_lm(arch: str):
    """A small randomly initialised causal LM of another architecture than the tiny trained one."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=128)).eval()
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=96, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("arch", ["tiny", "gpt2", "gpt_neox"])
def test_roll_outs_from_the_texts_cache_equal_fresh_roll_outs(tiny, rollouts, arch):
    """rollouts_from_text (each context's keys and values sliced from one pass over its text, the first token
    from the teacher-forced pass) gives the tokens greedy_continue gives from each context's own pass, with
    contexts of different lengths from different texts in one batch."""
    from icu_peft.metrics import greedy_continue, rollouts_from_text

    model = tiny[0] if arch == "tiny" else _random_lm(arch)
    seqs = rollouts[0] if arch == "tiny" else [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))
                                               for n in (23, 17)]
    rows = [(0, 1), (1, 5), (0, 9), (1, 2), (0, len(seqs[0]) - 3), (1, len(seqs[1]) - 1), (0, 4)]
    num_new = [len(seqs[b]) - d for b, d in rows]
    tf = teacher_forced(model, seqs, 0)
    first = [int(tf.predictions[b, d - 1]) for b, d in rows]
    fresh = greedy_continue(model, [seqs[b][:d] for b, d in rows], num_new, pad_id=0, batch_size=3)
    assert [f[0] for f in fresh] == first  # the premise: the teacher-forced argmax is the roll-out's first token
    assert rollouts_from_text(model, seqs, rows, first, num_new, pad_id=0, batch_size=3) == fresh


def test_finished_roll_outs_leave_the_decoding_batch(tiny, rollouts):
    """A batch of roll-outs of different lengths decodes each row only for its own tokens (rows that are done
    leave the batch and its KV cache), and every row's tokens are still the textbook greedy loop's."""
    model, tok = tiny
    x = rollouts[0][0]
    contexts, num_new = [x[:3], x[:5], x[:8], x[:4]], [14, 2, 3, 2]
    rows = []  # the batch size of each one-token pass
    hook = model.base_model.register_forward_pre_hook(
        lambda m, a, kw: rows.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] == 1 else None,
        with_kwargs=True)
    try:
        got = greedy_continue(model, contexts, num_new, pad_id=tok.pad_token_id, batch_size=4)
    finally:
        hook.remove()
    assert got == [naive_greedy(model, c, k) for c, k in zip(contexts, num_new)]
    assert rows[0] == 4 and rows[-1] == 1 and len(rows) == max(num_new) - 1
    assert sum(rows) < 4 * (max(num_new) - 1)


def test_el_runs_no_context_again_and_falls_back_where_the_cache_is_not_plain(tiny, rollouts, monkeypatch):
    """On never-seen text (a roll-out at nearly every position) EL_n runs two passes of more than one token
    (the teacher-forced one and the one over the text whose cache the roll-outs share); where the model's
    cache is not a plain per-layer KV cache, every context runs again and EL_n is unchanged."""
    import icu_peft.metrics as metrics

    model, tok = tiny
    seqs = rollouts[0][1:]
    teacher_forced(model, seqs, tok.pad_token_id)  # backbone_and_head's one-off check, before counting
    widths = []  # every pass runs the decoder stack, the teacher-forced one (its own head) included
    hook = model.base_model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = extraction_likelihood(model, seqs, 10, tok.pad_token_id, batch_size=4)
        assert sum(w > 1 for w in widths) == 2 and len(widths) > len(seqs[0])
        widths.clear()
        monkeypatch.setattr(metrics, "_plain_kv", lambda cache: None)
        again = extraction_likelihood(model, seqs, 10, tok.pad_token_id, batch_size=4)
    finally:
        hook.remove()
    assert again == shared
    x, preds = seqs[0], teacher_forced(model, seqs, tok.pad_token_id).predictions[0]
    deviations = sum(int(preds[d - 1]) != int(x[d]) for d in range(1, len(x)))
    assert deviations > 8  # the premise: never-seen text needs many roll-outs
    # the teacher-forced pass, the text's (its cache refused), then one pass per batch of 4 contexts
    assert sum(w > 1 for w in widths) == 2 + math.ceil(deviations / 4)


def test_rollout_rows_fit_the_kv_caches_in_a_scoring_batchs_logits_memory():
    """By hand: a Llama config with grouped KV heads and GPT-2's; rows = logits bytes of a scoring batch
    (batch x min(64, T) x vocab x 4) over a row's KV cache (T tokens), within [batch_size, cap]."""
    from transformers import GPT2Config, LlamaConfig

    from icu_peft.metrics import kv_bytes_per_token, rollout_rows

    llama = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                        vocab_size=49152)
    assert kv_bytes_per_token(llama) == 30 * 2 * 3 * 64 * 4
    gpt2 = GPT2Config(n_layer=2, n_head=4, n_embd=48)
    assert kv_bytes_per_token(gpt2) == 2 * 2 * 4 * 12 * 4
    per = kv_bytes_per_token(llama)
    assert rollout_rows(per, 49152, 85, 16) == 16 * 64 * 49152 * 4 // (per * 85) == 51
    assert rollout_rows(per, 49152, 40, 16) == 64  # 16*40*49152*4 / (46080*40) = 68 rows would fit: the cap
    assert rollout_rows(per, 49152, 40, 16, cap=1000) == 68
    assert rollout_rows(per, 1000, 85, 16) == 16  # a small vocabulary: never fewer than the batch
    assert rollout_rows(None, 49152, 85, 16) == 16 and rollout_rows(per, None, 85, 16) == 16


def test_el_decodes_in_rollout_rows_batches_with_the_same_result(tiny, rollouts, monkeypatch):
    """More roll-outs per decoding batch: fewer single-token passes, the same EL_n."""
    import icu_peft.metrics as metrics

    model, tok = tiny
    seqs = rollouts[0]
    counts, values = {}, {}
    for cap in (2, 64):
        monkeypatch.setattr(metrics, "rollout_rows", lambda *a, **k: cap)
        widths = []
        hook = model.base_model.register_forward_pre_hook(
            lambda m, a, kw: widths.append(kw["input_ids"].shape[1]), with_kwargs=True)
        try:
            values[cap] = extraction_likelihood(model, seqs, 10, tok.pad_token_id, batch_size=2)
        finally:
            hook.remove()
        counts[cap] = sum(w == 1 for w in widths)
    assert values[2] == values[64]
    assert counts[64] < counts[2] / 3


@torch.no_grad()
def test_windowed_perplexity_matches_a_window_by_window_computation(tiny, tiny_corpus):
    model, tok = tiny
    seqs = [_ids(tok, t) for t in tiny_corpus["unseen"][:3]]
    window, stride = 12, 5
    got = perplexity(model, seqs, tok.pad_token_id, window=window, stride=stride, batch_size=4)
    for x, ppl in zip(seqs, got.per_sample):
        nll, count = 0.0, 0
        for b, e, first in sliding_windows(len(x), window, stride):
            lp = torch.log_softmax(model(input_ids=x[b:e][None]).logits[0].double(), -1)
            for pos in range(first, e):
                nll -= float(lp[pos - b - 1, x[pos]].detach())
                count += 1
        assert ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a window holding the whole text gives transformers' own loss
    full = perplexity(model, seqs, tok.pad_token_id, window=256)
    for x, ppl in zip(seqs, full.per_sample):
        loss = model(input_ids=x[None], labels=x[None]).loss
        assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)


# ------------------------------------------------------------------------------ secret extraction

def test_secret_pure_functions():
    assert secret_token_accuracy([1, 2, 3, 9], [1, 2, 3]) == 1.0
    assert secret_token_accuracy([1, 5, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert secret_token_accuracy([], [1]) == 0.0
    assert secret_in_text("Email: ana.diaz@example.org, phone", "ana.diaz@example.org")
    assert secret_in_text("a  b\nc", "a b c")
    assert not secret_in_text("ana.diaz@example.com", "ana.diaz@example.org")
    assert not secret_in_text("anything", "   ")


def test_split_secret_tokens_keeps_the_joint_tokenization(tiny):
    _, tok = tiny
    for prefix, secret in (("record 12: amber", " basalt cobalt."), ("record 12: amb", "er basalt")):
        p, s = split_secret_tokens(tok, prefix, secret)
        assert p.tolist() + s == tok(prefix + secret)["input_ids"]
        assert len(s) >= 1


def test_secret_extraction_on_memorised_and_unseen_text(tiny, tiny_corpus):
    model, tok = tiny

    def pair(text):
        words = text.split(" ")
        return " ".join(words[:5]), " " + " ".join(words[5:])

    rows = secret_extraction(model, tok, [pair(t) for t in tiny_corpus["forget"]] + [pair(t) for t in tiny_corpus["unseen"][:4]])
    assert [r["extracted"] for r in rows[:4]] == [1.0] * 4
    assert all(r["token_accuracy"] == 1.0 for r in rows[:4])
    assert sum(r["extracted"] for r in rows[4:]) == 0.0
    assert all(set(r) == {"extracted", "token_accuracy"} for r in rows)  # numbers only, never text


def test_lazy_el_skips_only_samples_whose_ma_fails(tiny, tiny_corpus):
    """el_max_ma: EL is None where MA is above the cut and equal to the full computation elsewhere."""
    from icu_peft.metrics import score_samples

    model, tok = tiny
    seqs = [_ids(tok, tiny_corpus["forget"][0]), _ids(tok, tiny_corpus["unseen"][0]), _ids(tok, tiny_corpus["forget"][1])]
    full = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2)
    cut = (full.ma[0] + full.ma[1]) / 2  # between the memorised and the unseen sample
    assert full.ma[1] < cut < full.ma[0]
    lazy = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2, el_max_ma=cut)
    assert lazy.ma == full.ma
    for m, e_lazy, e_full in zip(full.ma, lazy.el, full.el):
        if m <= cut:
            assert e_lazy == pytest.approx(e_full, abs=1e-12)
        else:
            assert e_lazy is None
    assert lazy.mean()["el"] == pytest.approx(full.el[1])


def test_lazy_el_also_skips_samples_whose_nll_is_still_under_the_band(tiny, tiny_corpus):
    """el_min_nll: EL is None where the mean NLL is below the cut (too likely to be forgotten), exact elsewhere."""
    from icu_peft.metrics import score_samples

    model, tok = tiny
    seqs = [_ids(tok, tiny_corpus["forget"][0]), _ids(tok, tiny_corpus["unseen"][0])]
    full = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2)
    cut = (full.nll[0] + full.nll[1]) / 2  # the memorised sample is far more likely than the unseen one
    assert full.nll[0] < cut < full.nll[1]
    lazy = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2, el_min_nll=cut)
    assert lazy.nll == full.nll and lazy.el[0] is None
    assert lazy.el[1] == pytest.approx(full.el[1], abs=1e-12)


def test_el_for_measures_only_the_flagged_samples(tiny, tiny_corpus):
    """el_for: EL_n only where the flag is set (and the MA / NLL cuts pass), exact there."""
    model, tok = tiny
    seqs = [_ids(tok, tiny_corpus["unseen"][0]), _ids(tok, tiny_corpus["unseen"][1]), _ids(tok, tiny_corpus["forget"][0])]
    full = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2)
    some = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2, el_for=[False, True, True])
    assert some.ma == full.ma and some.el[0] is None and some.el[1:] == pytest.approx(full.el[1:], abs=1e-12)
    none = score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2, el_max_ma=1.0, el_for=[False] * 3)
    assert none.el == [None] * 3


def test_the_scoring_bar_moves_during_the_roll_outs_and_ends_at_the_sample_count(tiny, tiny_corpus):
    """A chunk of never-seen text can take minutes of EL roll-outs: the bar must move inside the chunk,
    and still count exactly one per sample at the end (also where lazy scoring skips the roll-outs)."""
    from icu_peft.metrics import score_samples

    class Bar:
        def __init__(self):
            self.updates = []

        def update(self, k):
            self.updates.append(k)

    model, tok = tiny
    seqs = [_ids(tok, t) for t in tiny_corpus["unseen"][:3]]  # never seen: many deviations, many roll-outs
    bar = Bar()
    score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2, progress=bar)
    assert sum(bar.updates) == pytest.approx(3)
    assert len(bar.updates) > 2  # more than one move per chunk of two
    lazy = Bar()
    score_samples(model, seqs, tok.pad_token_id, el_n=10, batch_size=2, progress=lazy, el_max_ma=-1.0)
    assert sum(lazy.updates) == pytest.approx(3)
