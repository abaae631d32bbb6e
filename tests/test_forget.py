"""The ICU engine end to end on a tiny model that memorised its training sequences."""

import json
import logging

import pytest
import torch

from conftest import quick_config
from icu_peft.adapters import MANIFEST_NAME, read_manifest
from icu_peft.data import pad_batch, sample_id
from icu_peft.metrics import score_samples
from icu_peft.models import load_base_model, load_tokenizer
from icu_peft.unlearner import forget


def _scores(model, tok, texts):
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    return score_samples(model, seqs, tok.pad_token_id, el_n=10)


def test_forget_reaches_thresholds_and_keeps_retain(tiny_forget_adapter, tiny_model_dir, tiny_corpus):
    """The issue's bar: every forget sample at or below the thresholds, retain keeps >= 90% of its MA."""
    m = read_manifest(tiny_forget_adapter)
    thr = m["thresholds"]
    assert thr["source"] == "unseen"
    assert m["status"] == "forgotten"
    assert all(s["forgotten"] and s["band"] == "inside" for s in m["samples"])
    # recompute the scores ourselves from the saved adapter rather than trusting the report (which ships none)
    from icu_peft.adapters import load_forget_adapters

    tok = load_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), quantize=True)
    assert min(_scores(base, tok, tiny_corpus["forget"][:2]).ma) > thr["ma"]  # it was memorised to begin with
    before = _scores(base, tok, tiny_corpus["retain"]).mean()["ma"]
    model = load_forget_adapters(base, [tiny_forget_adapter])
    after = _scores(model, tok, tiny_corpus["retain"]).mean()["ma"]
    fg = _scores(model, tok, tiny_corpus["forget"][:2])
    assert max(fg.ma) <= thr["ma"] + 1e-6
    assert after >= 0.9 * before, (before, after)


def test_manifest_holds_no_text_and_identifies_samples_by_keyed_hash(tiny_forget_adapter, tiny_corpus, id_key_dir):
    from icu_peft.idkeys import find_key, key_id

    m = read_manifest(tiny_forget_adapter)
    # the key of the ids is not in the artifact: only its id, and the key is in the operator's key directory
    assert "salt" not in m and m["id_key"]
    key = find_key(m["id_key"])
    assert key is not None and key_id(key) == m["id_key"] and (id_key_dir / f"{m['id_key']}.hex").is_file()
    assert key not in (tiny_forget_adapter / "forget_manifest.json").read_text()
    ids = [sample_id(t, key) for t in tiny_corpus["forget"][:2]]
    assert [s["id"] for s in m["samples"]] == ids
    for p in tiny_forget_adapter.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            for text in tiny_corpus["forget"]:
                for piece in (text, text[:30], text[-30:]):
                    assert piece.encode() not in blob, f"forgotten text found in {p.name}"
    for key in ("request_id", "base", "config", "thresholds", "history", "epochs", "wall_time_s", "peak_rss_mb",
                "versions", "files"):
        assert key in m
    assert m["request_id"] == "req-a"
    assert m["base"]["fingerprint"]["sha256"] and m["versions"]["peft"]


def test_adapter_reloads_in_stock_peft_with_identical_logits(tiny_forget_adapter, tiny_model_dir, tiny_corpus):
    from peft import PeftModel

    from icu_peft.adapters import load_forget_adapters

    tok = load_tokenizer(str(tiny_model_dir))
    ids, mask = pad_batch([torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["forget"]], tok.pad_token_id)
    stock = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir), quantize=True), str(tiny_forget_adapter))
    ours = load_forget_adapters(load_base_model(str(tiny_model_dir), quantize=True), [tiny_forget_adapter])
    base = load_base_model(str(tiny_model_dir), quantize=True)
    with torch.no_grad():
        a = stock(input_ids=ids, attention_mask=mask).logits
        b = ours(input_ids=ids, attention_mask=mask).logits
        c = base(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)  # the adapter does something


def test_unquantized_path_and_iur_removes_samples(tiny_model_dir, tiny_corpus, tmp_path):
    cfg = quick_config(tiny_model_dir, quantize=False)
    r = forget(cfg, tiny_corpus["forget"], tiny_corpus["retain"], tiny_corpus["unseen"], output_dir=tmp_path / "fp")
    rep = r.report
    assert rep["base"]["quantized"] is False
    actives = [h["active"] for h in rep["history"]]
    assert actives[0] == len(tiny_corpus["forget"])
    # IUR: the active set shrinks as samples settle in the never-seen band; the request ends with
    # every sample inside the band (the set's mean mid-band may end it before each one settled)
    assert any(a < actives[0] for a in actives[1:])
    assert all(s["band"] == "inside" for s in rep["samples"])
    assert (tmp_path / "fp" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "fp" / MANIFEST_NAME).read_text())["status"] == "forgotten"


def test_max_epochs_caps_training_and_status_says_so(tiny_model_dir, tiny_corpus):
    r = forget(quick_config(tiny_model_dir, max_epochs=1), tiny_corpus["forget"], tiny_corpus["retain"],
               tiny_corpus["unseen"])
    assert r.report["epochs"] == 1 and r.report["status"] == "partial"  # not in the band after one epoch
    assert r.output_dir is None


@pytest.mark.parametrize("precision_check,passes", [("off", 1), ("auto", 2)])
def test_nan_loss_restores_last_good_weights(tiny_model_dir, tiny_corpus, monkeypatch, precision_check, passes):
    import icu_peft.unlearner as U

    real = U.icu_step_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > passes:  # the first step's passes (with the precision view: 4-bit, then the view)
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(U, "icu_step_loss", poisoned)
    cfg = quick_config(tiny_model_dir, batch_size=8, precision_check=precision_check)
    r = forget(cfg, tiny_corpus["forget"], tiny_corpus["retain"], tiny_corpus["unseen"])
    assert r.report["status"] == "nan_restored"
    assert r.report["steps"] == 1  # step 1 was good, step 2 hit the NaN: the round's start is restored
    assert all(torch.isfinite(p).all() for p in r.model.parameters())


def test_without_retain_pool_neighbours_are_generated_or_refused(tiny_model_dir, tiny_corpus, caplog):
    from icu_peft.errors import InputError

    with caplog.at_level(logging.INFO, logger="icu_peft"):
        r = forget(quick_config(tiny_model_dir, max_epochs=1, generated_retain_size=4), tiny_corpus["forget"][:1],
                   None, tiny_corpus["unseen"])
    assert r.report["retain"]["source"] == "generated"
    # 4 sampled; one that regurgitates the forget sample is dropped (on one machine's numerics 1 of the 4 was)
    dropped = [rec.message for rec in caplog.records if "dropped for overlapping the forget set" in rec.message]
    assert r.report["retain"]["count"] == 4 or (1 <= r.report["retain"]["count"] < 4 and dropped)
    with pytest.raises(InputError, match="no retain pool"):
        forget(quick_config(tiny_model_dir, no_retain="refuse"), tiny_corpus["forget"][:1], None, None)


def test_default_thresholds_warn(tiny_model_dir, tiny_corpus, caplog):
    r = forget(quick_config(tiny_model_dir, max_epochs=0), tiny_corpus["forget"][:1], tiny_corpus["retain"], None)
    assert r.report["thresholds"]["source"] == "default"
    assert any("no --unseen" in rec.message for rec in caplog.records)


def test_explicit_thresholds_skip_scoring_unseen_but_keep_the_mia(tmp_path, tiny_model_dir, tiny_corpus, monkeypatch):
    """Given both thresholds, unseen text is not scored (costly EL roll-outs) yet still feeds the MIA report."""
    import icu_peft.unlearner as unl

    calls = []
    real = unl.score_samples
    monkeypatch.setattr(unl, "score_samples", lambda model, seqs, *a, **k: calls.extend(tuple(x.tolist()) for x in seqs)
                        or real(model, seqs, *a, **k))
    cfg = quick_config(tiny_model_dir, max_epochs=1, ma_threshold=0.3, el_threshold=0.05)
    r = forget(cfg, tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"], output_dir=tmp_path / "a")
    assert r.report["thresholds"]["source"] == "config"
    assert r.report["thresholds"]["ma"] == 0.3 and r.report["thresholds"]["el"] == 0.05
    assert r.report["mia"] is not None
    tok = load_tokenizer(str(tiny_model_dir))
    unseen = {tuple(tok(t)["input_ids"]) for t in tiny_corpus["unseen"]}
    forget_ids = {tuple(tok(t)["input_ids"]) for t in tiny_corpus["forget"][:2]}
    assert forget_ids <= set(calls)  # the spy sees what is scored (else this test would prove nothing)
    assert not unseen & set(calls)  # and no unseen text was scored


def test_cached_reference_matches_the_reference_and_only_caches_right_padding(tiny_model_dir, tiny_corpus):
    from icu_peft.metrics import backbone_and_head
    from icu_peft.unlearner import CachedReference

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base_model(str(tiny_model_dir), quantize=False)
    calls = []
    backbone, _ = backbone_and_head(model)

    def plain(ids, mask):
        return backbone(input_ids=ids, attention_mask=mask).last_hidden_state

    def counted(ids, mask):
        calls.append(ids.shape[0])
        return plain(ids, mask)

    seqs = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["retain"][:4]]
    cache = CachedReference(counted, max_bytes=1 << 30)
    with torch.no_grad():
        ids, mask = pad_batch(seqs[:3], tok.pad_token_id)
        want = plain(ids, mask)
        got = cache(ids, mask)
        assert calls == [3]
        # a new batch mixing seen and unseen rows, in another order and width: only the new row is computed
        ids2, mask2 = pad_batch([seqs[3], seqs[1], seqs[0]], tok.pad_token_id)
        got2 = cache(ids2, mask2)
        assert calls == [3, 1] and cache.hits == 2 and cache.misses == 4
        want2 = plain(ids2, mask2)
        for a, b, m in ((got, want, mask), (got2, want2, mask2)):
            v = m.bool()
            assert torch.allclose(a[v], b[v], atol=1e-5)
        # left padding is not cached (a row's hidden states would depend on its batch-mates' widths)
        lids, lmask = pad_batch(seqs[:2], tok.pad_token_id, side="left")
        cache(lids, lmask)
        assert calls[-1] == 2 and cache.hits == 2
        # a zero budget caches nothing
        off = CachedReference(counted, max_bytes=0)
        off(ids, mask), off(ids, mask)
        assert calls[-2:] == [3, 3] and not off.store


def test_reference_cache_leaves_the_adapter_unchanged(tiny_model_dir, tiny_corpus):
    """Same seed with and without the cache: the trained LoRA weights agree (the cache only skips recomputation)."""
    runs = []
    for mb in (0, 64):
        r = forget(quick_config(tiny_model_dir, max_epochs=2, quantize=False, reference_cache_mb=mb),
                   tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
        runs.append({n: p.detach().clone() for n, p in r.model.named_parameters() if "lora_" in n})
        assert (r.report["reference_cache"]["hits"] > 0) == (mb > 0), r.report["reference_cache"]
    assert runs[0].keys() == runs[1].keys() and runs[0]
    for n in runs[0]:
        assert torch.allclose(runs[0][n], runs[1][n], atol=1e-4), n


def test_neighbour_micro_batches_give_the_same_gradient(tiny_model_dir, tiny_corpus):
    from icu_peft.config import ICUConfig
    from icu_peft.models import attach_lora
    from icu_peft.unlearner import icu_step_backward

    tok = load_tokenizer(str(tiny_model_dir))
    model = attach_lora(load_base_model(str(tiny_model_dir), quantize=False), 4, 8, 0.0, "all-linear", False)
    model.train()
    f = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["forget"][:2]]
    n = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["retain"][:5]]
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # LoRA B starts at zero; give the adapter a non-trivial state
            p.data.normal_(0, 0.05)
    grads, outs = [], []
    for micro in (0, 2):
        cfg = ICUConfig(neighbour_micro_batch=micro, learn_weight=0.5, kl_weight=1.0, forget_loss="ga")
        model.zero_grad(set_to_none=True)
        outs.append(icu_step_backward(model, f, n, tok.pad_token_id, cfg, scale=0.5))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in ("loss", "l_fgt", "l_lrn", "l_kl"):
        assert outs[0][k] == pytest.approx(outs[1][k], rel=1e-4, abs=1e-6), k
    assert outs[0]["l_kl"] > 0 and outs[0]["l_lrn"] > 0
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-6), k
    assert any(g.abs().sum() > 0 for g in grads[0].values())


@pytest.fixture(scope="module")
def unbounded_run(tiny_model_dir, tiny_corpus):
    """Gradient ascent (no NLL target) on two forget samples: how far the ascent moves their loss.

    Without never-seen text there is no band (the published thresholds decide), which is where the
    post-hoc scaling (nll_target, a number) still applies; calibrated forgetting (the default) does not need it."""
    # precision_check off: the scaling matches the mean NLL over every precision view, these tests read the 4-bit one's
    r = forget(quick_config(tiny_model_dir, forget_loss="ga", precision_check="off"), tiny_corpus["forget"][:2],
               tiny_corpus["retain"], None)
    return r.report


def _mean_nll(report):
    return sum(s["after"]["nll"] for s in report["samples"]) / len(report["samples"])


@pytest.mark.parametrize("where", ["below", "above"])
def test_nll_target_scales_the_adapter_towards_the_target_and_keeps_every_sample_forgotten(
        tiny_model_dir, tiny_corpus, unbounded_run, where):
    """Ascent ends wherever it ends. Trained on past the point of forgetting (min_epochs), it overshoots the
    loss the plain run stopped at: nll_target at that level scales the adapter down. With a target above
    the plain run's level, it scales it up. Either way the scaled adapter ends nearer the target, with
    every sample still forgotten."""
    off = unbounded_run
    assert off["thresholds"]["nll"] is None and off["calibration"] is None and off["status"] == "forgotten"
    lo = max(s["before"]["nll"] for s in off["samples"])
    hi = _mean_nll(off)
    assert hi > lo + 1.0  # the ascent did raise the loss
    extra = dict(min_epochs=off["epochs"] + 30) if where == "below" else {}
    target = hi if where == "below" else hi + 1.0
    on = forget(quick_config(tiny_model_dir, forget_loss="ga", nll_target=target, nll_tolerance=0.1,
                             precision_check="off", **extra),
                tiny_corpus["forget"][:2], tiny_corpus["retain"], None)
    rep = on.report
    cal = rep["calibration"]
    assert rep["thresholds"]["nll"] == target and rep["status"] == "forgotten"
    assert (cal["scale"] < 1.0) if where == "below" else (cal["scale"] > 1.0), cal
    assert abs(cal["nll_before"] - target) > 0.5, (cal, target)  # there was a gap to close
    assert abs(_mean_nll(rep) - target) < abs(cal["nll_before"] - target) - 0.1, (cal, target)
    for s in rep["samples"]:
        assert s["forgotten"], s["after"]
    # the reported scores are the scaled adapter's: recompute them from the returned model
    tok = load_tokenizer(str(tiny_model_dir))
    again = score_samples(on.model, [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["forget"][:2]],
                          tok.pad_token_id, el_n=10)
    assert again.nll == pytest.approx([s["after"]["nll"] for s in rep["samples"]], rel=1e-3)


@pytest.mark.parametrize("explicit", [False, True], ids=["scored", "explicit-thresholds"])
def test_nll_target_unseen_is_the_bases_mean_nll_on_unseen_text(tiny_model_dir, tiny_corpus, explicit):
    """Whether the thresholds come from scoring the unseen text (its NLL comes along) or from the config
    (the unseen text is then only run forward for its NLL)."""
    from icu_peft.metrics import teacher_forced

    given = dict(ma_threshold=0.3, el_threshold=0.05) if explicit else {}
    r = forget(quick_config(tiny_model_dir, nll_target="unseen", max_epochs=1, **given), tiny_corpus["forget"][:2],
               tiny_corpus["retain"], tiny_corpus["unseen"]).report
    assert r["thresholds"]["source"] == ("config" if explicit else "unseen")
    tok = load_tokenizer(str(tiny_model_dir))
    base = load_base_model(str(tiny_model_dir), quantize=True)
    nll = teacher_forced(base, [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["unseen"]], tok.pad_token_id).nll()
    assert r["thresholds"]["nll"] == pytest.approx(float(nll.mean()), rel=1e-4)


def test_nll_target_unseen_needs_unseen_text(tiny_model_dir, tiny_corpus):
    from icu_peft.errors import InputError

    with pytest.raises(InputError, match="nll_target='unseen' needs unseen text"):
        forget(quick_config(tiny_model_dir, nll_target="unseen", max_epochs=1), tiny_corpus["forget"][:2],
               tiny_corpus["retain"], None)


def test_without_iur_the_whole_set_trains_until_its_means_pass():
    """Jang et al.'s rule (iur=False, the ga/graddiff/npo presets): all samples or none."""
    from icu_peft.config import ICUConfig
    from icu_peft.metrics import Scores
    from icu_peft.refine import Thresholds
    from icu_peft.unlearner import _active

    thr = Thresholds(ma=0.5, el=0.1)
    jang, iur = ICUConfig.for_method("ga"), ICUConfig.for_method("icu")
    one_left = Scores(ma=[0.2, 0.2, 0.9], el=[0.0, 0.0, 0.0])  # mean MA 0.43 passes; one sample does not
    two_left = Scores(ma=[0.2, 0.9, 0.9], el=[0.0, 0.0, 0.0])  # mean MA 0.67 fails
    assert _active(one_left, thr, jang) == [False] * 3
    assert _active(two_left, thr, jang) == [True] * 3
    assert _active(one_left, thr, iur) == [False, False, True]


def test_unseen_anchor_holds_never_seen_text_to_the_reference(tiny_model_dir, tiny_corpus):
    """unseen_kl_samples: never-seen samples join each step with a KL-only term; without the term the
    same steps move never-seen text further from the untouched base."""
    import torch.nn.functional as F

    from icu_peft.models import load_base_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ids = [torch.tensor(tok(t)["input_ids"]) for t in tiny_corpus["unseen"]]
    base = load_base_model(str(tiny_model_dir), quantize=False)

    def drift(model):  # mean KL(base || model) over the never-seen texts' next tokens
        total = 0.0
        with torch.no_grad():
            for x in ids:
                p = F.log_softmax(base(input_ids=x[None]).logits.float(), -1)
                q = F.log_softmax(model(input_ids=x[None]).logits.float(), -1)
                total += float((p.exp() * (p - q)).sum(-1).mean())
        return total / len(ids)

    # the retain guard off: with it one run stopped early on a restore (one torch thread on one machine: 3 of 12
    # rounds) and the two runs' drifts were of different lengths of training (ratio 0.81; 0.35-0.40 without it)
    kw = dict(quantize=False, learning_rate=3e-3, min_epochs=12, max_epochs=12, iur=False, precision_check="off",
              retain_floor=0.0)
    runs = {}
    for n in (0, 4):
        r = forget(quick_config(tiny_model_dir, unseen_kl_samples=n, **kw), tiny_corpus["forget"][:2],
                   tiny_corpus["retain"], tiny_corpus["unseen"])
        runs[n] = (drift(r.model), r.report["history"])
    assert all("l_kl_unseen" in h for h in runs[4][1][1:]) and not any("l_kl_unseen" in h for h in runs[0][1])
    assert runs[4][0] < 0.75 * runs[0][0]


def test_entropy_targets_follow_the_never_seen_text_and_pull_forget_positions_towards_them(
        tiny_model_dir, tiny_corpus, monkeypatch):
    """entropy_weight: every scoring round re-aims the entropy targets at the never-seen text as the
    trained model has it (TokenTargets.follow_unseen, with every never-seen token), and the same steps
    with the term leave the forget positions' entropies nearer their targets than without it."""
    from icu_peft.calibrate import TokenTargets
    from icu_peft.metrics import next_token_entropies

    tok = load_tokenizer(str(tiny_model_dir))
    unseen_tokens = sum(len(tok(t)["input_ids"]) - 1 for t in tiny_corpus["unseen"])
    calls, states = [], []
    real = TokenTargets.follow_unseen

    def spy(self, entropy):
        calls.append(entropy.numel())
        states.append(self)
        return real(self, entropy)

    monkeypatch.setattr(TokenTargets, "follow_unseen", spy)
    kw = dict(quantize=False, learning_rate=3e-3, min_epochs=10, max_epochs=10, iur=False, precision_check="off")
    texts = tiny_corpus["forget"][:2]
    runs = {}
    for w in (1.0, 0.0):
        calls.clear()
        runs[w] = forget(quick_config(tiny_model_dir, entropy_weight=w, **kw), texts, tiny_corpus["retain"],
                         tiny_corpus["unseen"])
        if w:
            assert len(calls) >= len(runs[w].report["history"]) - 1 and set(calls) == {unseen_tokens}
        else:
            assert not calls  # off: no extra pass over the never-seen text
    targets = states[-1].entropy
    ids = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    assert [t.numel() for t in targets] == [x.numel() - 1 for x in ids]

    def gap(model):  # mean |entropy - target| over the forget positions
        ent = next_token_entropies(model, ids, tok.pad_token_id)
        return float(torch.cat([(e - t).abs() for e, t in zip(ent, targets)]).mean())

    assert gap(runs[1.0].model) < gap(runs[0.0].model)


def test_log_push_brings_the_hardest_targets_within_reach(tiny_model_dir, tiny_corpus, monkeypatch):
    """target_log_weight: the BCE's pull on a token (p - p*) fades as its probability shrinks, so positions
    aimed at never-seen text's hardest losses stop short of them, and the forgotten text's hardest tokens
    stay easier than never-seen text's (what Min-K% reads). The same steps with the push at 0.3 leave those
    positions nearer their targets than with a tenth of it."""
    import torch.nn.functional as F

    from icu_peft.calibrate import TokenTargets

    tok = load_tokenizer(str(tiny_model_dir))
    states = []
    real = TokenTargets.follow_unseen

    def spy(self, entropy):
        states.append(self)
        return real(self, entropy)

    monkeypatch.setattr(TokenTargets, "follow_unseen", spy)
    texts = tiny_corpus["forget"][:2]
    ids = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    # the hardest fifth not steered: its moves change the very targets this measures against; the retain guard
    # off, so both runs train all 20 epochs (with it, one run of a pair stopped early on one machine)
    kw = dict(quantize=False, learning_rate=3e-3, min_epochs=20, max_epochs=20, iur=False, precision_check="off",
              tail_attacks="", retain_floor=0.0)

    def shortfall(weight, seed):  # mean nats still missing on the positions with the highest fifth of targets
        states.clear()
        model = forget(quick_config(tiny_model_dir, target_log_weight=weight, seed=seed, **kw), texts,
                       tiny_corpus["retain"], tiny_corpus["unseen"]).model.eval()
        targets = [-t for t in states[-1].logp]
        with torch.no_grad():
            nll = [-F.log_softmax(model(input_ids=x[None]).logits[0, :-1].float(), -1).gather(-1, x[1:, None])[:, 0]
                   for x in ids]
        t, n = torch.cat(targets), torch.cat(nll)
        top = t >= torch.quantile(t, 0.8)
        return float((t[top] - n[top]).clamp(min=0).mean())

    # over three seeds: one pair alone is noisy (measured, 2026-12-07, one and two threads: differences of -0.07
    # to 1.65 nats, means 6.89 against 7.57 and 7.90 against 8.69)
    pushed = sum(shortfall(0.3, seed) for seed in range(3)) / 3
    weak = sum(shortfall(0.03, seed) for seed in range(3)) / 3
    assert pushed < weak - 0.3


def test_a_confirmation_reuses_the_trained_views_scores_of_the_same_weights(tiny_model_dir, tiny_corpus, monkeypatch):
    """The confirmation right after a settled round scored the trained view already (every EL_n known, the
    same weights): it reuses those scores, and the request ends exactly where it ends without the reuse.
    (Rounds measure every EL_n with el_each_round, or where every sample is watched; deferred EL_n, the
    default, leaves nothing to reuse.)"""
    import icu_peft.unlearner as U

    original = U._Run._trained_view_scores
    reused = []

    def spy(self):
        out = original(self)
        reused.append(out is not None)
        return out

    def run():
        cfg = quick_config(tiny_model_dir, precision_check="on", el_each_round=True)
        return forget(cfg, tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"]).report

    monkeypatch.setattr(U._Run, "_trained_view_scores", spy)
    with_reuse = run()
    assert any(reused), "no complete scoring found the trained view's scores of the same weights"
    monkeypatch.setattr(U._Run, "_trained_view_scores", lambda self: None)
    without = run()
    assert with_reuse["status"] == without["status"] == "forgotten"
    assert with_reuse["steps"] == without["steps"]
    for a, b in zip(with_reuse["samples"], without["samples"]):
        assert a["after"] == b["after"]
    # a moved adapter is not served the old scores: its signature differs after any step
    from types import SimpleNamespace

    state = SimpleNamespace(trainable=[torch.zeros(4, 3), torch.ones(2)])
    before = U._Run._weights_signature(state)
    state.trainable[0][1, 2] += 1e-6
    assert U._Run._weights_signature(state) != before


def test_deferred_el_rounds_roll_out_nothing_and_the_stop_is_measured(tiny_model_dir, tiny_corpus, monkeypatch):
    """By default (el_each_round off) a scoring round between complete scorings runs no EL_n roll-out: a sample
    inside by MA and NLL counts as under the EL_n edge, the report records its EL_n there as not measured, and
    the request stops only on complete scores. With el_each_round the rounds measure EL_n where MA and NLL
    pass, as before. On the tiny memoriser no sample is held back by its EL_n alone, so both end alike."""
    import icu_peft.unlearner as U

    calls = []
    real = U.score_samples

    def spy(*a, **kw):
        out = real(*a, **kw)
        cut = -1.0 if kw.get("el_for") is not None and not any(kw["el_for"]) else kw.get("el_max_ma")
        calls.append((cut, sum(e is not None for e in out.el)))
        return out

    monkeypatch.setattr(U, "score_samples", spy)
    reports, seen = {}, {}
    for each_round in (False, True):
        calls.clear()
        cfg = quick_config(tiny_model_dir, precision_check="off", el_each_round=each_round)
        reports[each_round] = forget(cfg, tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"]).report
        seen[each_round] = list(calls)
    for r in reports.values():
        assert r["status"] == "forgotten"
        assert all(s["after"]["el"] is not None for s in r["samples"])  # the verdict's EL_n measured
    # deferred: EL_n only in complete scorings (no cut); no round's scoring asks for any (nothing watched)
    assert all(cut is None or (cut == -1.0 and measured == 0) for cut, measured in seen[False])
    assert sum(cut is None for cut, _ in seen[False]) >= 2  # before training and before stopping
    # each round: rounds measure EL_n of the samples inside by MA and NLL
    assert any(cut is not None and cut >= 0 and measured for cut, measured in seen[True])

    def unmeasured(r):
        return sum(e is None for h in r["per_sample_history"].values() for e in h["el"])

    assert unmeasured(reports[False]) > unmeasured(reports[True])
    assert reports[False]["steps"] == reports[True]["steps"]
    assert [s["after"] for s in reports[False]["samples"]] == [s["after"] for s in reports[True]["samples"]]


def test_a_complete_scoring_watches_a_sample_held_out_by_its_el_only():
    """watch_el: a sample inside by NLL and MA but over the EL_n edge in some view is measured at every round
    after; one too familiar by MA, or inside by all three, is not."""
    from types import SimpleNamespace

    from icu_peft.calibrate import Band
    from icu_peft.metrics import Scores
    from icu_peft.unlearner import _Run

    band = Band(nll_lo=2.0, nll_hi=3.0, nll_mid=2.5, inner_lo=2.2, inner_hi=2.8, ma_hi=0.7, ma_mid=0.5, el_hi=0.05, count=8, quantile=0.1, settle_quantile=0.2)
    state = SimpleNamespace(target=SimpleNamespace(band=band), forget_set=[0, 1, 2], el_watch=[False] * 3)
    # two views of three samples: sample 0 over the EL edge in the second view only, sample 1 over MA,
    # sample 2 inside everywhere
    scores = Scores(ma=[0.5, 0.9, 0.5, 0.5, 0.9, 0.5], el=[0.01, 0.2, 0.01, 0.08, 0.2, 0.02],
                    nll=[2.5, 2.5, 2.5, 2.5, 2.5, 2.5])
    _Run.watch_el(state, scores)
    assert state.el_watch == [True, False, False]
    presumed = Scores(ma=[0.5], el=[0.0], nll=[2.5], presumed=[True])
    assert _Run.recorded(presumed).el == [None] and _Run.recorded(presumed).presumed is None
    measured = Scores(ma=[0.5], el=[0.0], nll=[2.5])
    assert _Run.recorded(measured) is measured


def test_a_restore_point_keeps_its_scores_and_says_whether_they_were_measured():
    """keep / go_back: the adapter, scores, active flags and never-seen NLLs come back; scores of a complete
    scoring are not measured again (el_borrowed off), presumed or borrowed EL_n are (el_borrowed on)."""
    from types import SimpleNamespace

    from icu_peft.metrics import Scores
    from icu_peft.unlearner import _Run

    lin = torch.nn.Linear(2, 2)
    state = SimpleNamespace(model=lin, active=[True], unseen_now=[2.5], el_borrowed=False,
                            scores=Scores(ma=[0.5], el=[0.01], nll=[2.6]))
    state.unmeasured = lambda: _Run.unmeasured(state)
    state.measured = lambda: _Run.measured(state)
    measured = _Run.keep(state)
    state.scores = Scores(ma=[0.5], el=[0.0], nll=[2.6], presumed=[True])
    presumed = _Run.keep(state)
    assert measured.measured and not presumed.measured
    weight = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    state.unseen_now, state.active = [9.9], [False]
    _Run.go_back(state, presumed)
    assert state.el_borrowed and state.scores.presumed == [True]
    _Run.go_back(state, measured)
    assert torch.equal(lin.weight, weight) and state.scores.el == [0.01] and state.unseen_now == [2.5]
    assert state.active == [True] and not state.el_borrowed and not _Run.unmeasured(state)


def test_project_conflict_removes_only_the_part_against_the_retain_gradient():
    from icu_peft.unlearner import project_conflict

    f, r = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]
    cos = project_conflict(f, r)  # dot -1, |r|^2 2, |f|^2 5: f - (-1 / 2) r
    assert cos == pytest.approx(-1 / (2 * 5) ** 0.5)
    assert torch.allclose(f[0], torch.tensor([0.5, 0.5])) and torch.allclose(f[1], torch.tensor([2.0]))
    assert float(f[0] @ r[0] + f[1] @ r[1]) == pytest.approx(0.0)
    g = [torch.tensor([1.0, 0.0])]
    assert project_conflict(g, [torch.tensor([1.0, 1.0])]) > 0  # no conflict: untouched
    assert torch.equal(g[0], torch.tensor([1.0, 0.0]))
    h = [torch.tensor([1.0]), None]  # a tensor without a gradient on one side is skipped
    assert project_conflict(h, [torch.tensor([-1.0]), torch.tensor([3.0])]) == pytest.approx(-1.0)
    assert torch.allclose(h[0], torch.tensor([0.0]))


def test_retain_projection_runs_in_the_loop_and_keeps_each_step_from_opposing_the_kept_text(
        tiny_model_dir, tiny_corpus, monkeypatch):
    """With retain_projection every step's gradient, forget part projected, has a non-negative inner product
    with the retain terms' gradient beyond the retain gradient's own norm: g . r >= |r|^2."""
    import icu_peft.unlearner as un

    seen = []
    real = un.project_conflict

    def spy(fg, rg):
        cos = real(fg, rg)
        pairs = [(a, b) for a, b in zip(fg, rg) if a is not None and b is not None]
        seen.append((cos, sum(float((a * b).sum()) for a, b in pairs)))
        return cos

    monkeypatch.setattr(un, "project_conflict", spy)
    cfg = quick_config(tiny_model_dir, retain_projection=True, quantize=False, precision_check="off", max_steps=12)
    r = forget(cfg, tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
    assert len(seen) == r.report["steps"] > 0
    assert all(dot >= -1e-6 for _, dot in seen)  # the forget part never opposes the kept text after projection
    assert any(cos < 0 for cos, _ in seen)  # and there was something to project
    assert all("grad_cos" in h for h in r.report["history"][1:])


def test_a_bar_moved_by_fractions_prints_whole_counts():
    """Roll-outs move a bar that counts samples by fractions: it shows '2/8', not '2.18388.../8'."""
    import io

    from icu_peft.unlearner import _bar

    out = io.StringIO()
    bar = _bar(8, "scoring", True, file=out)
    bar.update(2.1838862559241705)
    bar.refresh()
    bar.close()
    assert "2/8" in out.getvalue() and "2.18" not in out.getvalue()


def test_a_new_best_state_is_confirmed_only_where_the_run_could_stop_on_it():
    """confirm_new_best: EL_n roll-outs in every view for a new best state with every sample inside on
    unmeasured EL_n, only when the set is also centred; off centre (the run cannot stop there), or not
    better, or not every sample inside, or already measured: no roll-outs."""
    from types import SimpleNamespace

    from icu_peft.unlearner import _Run

    def state(centring: bool, unmeasured: bool = True, tail_centring: bool = False):
        s = SimpleNamespace(forget_set=[0, 1], centring=centring)
        s.unmeasured = lambda: unmeasured
        s.tails_centring = lambda: tail_centring
        return s

    assert _Run.confirm_new_best(state(False), (2, -0.0), (1, -0.2))
    assert not _Run.confirm_new_best(state(True), (2, -0.05), (1, -0.2))  # off centre: kept unmeasured
    assert not _Run.confirm_new_best(state(False, tail_centring=True), (2, -0.05), (1, -0.2))  # Min-K% off centre
    assert not _Run.confirm_new_best(state(False, unmeasured=False), (2, 0.0), (1, -0.2))
    assert not _Run.confirm_new_best(state(False), (1, 0.0), (0, -0.2))  # a sample still outside
    assert not _Run.confirm_new_best(state(False), (2, -0.1), (2, -0.05))  # not better
