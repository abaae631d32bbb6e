"""The frozen-prefix cache: running only the trained top layers must not change what a step computes."""

import pytest
import torch

from conftest import quick_config
from icu_peft.caches import CachedReference, FrozenPrefixBackbone, first_trained_layer
from icu_peft.config import ICUConfig
from icu_peft.data import pad_batch
from icu_peft.models import attach_lora, load_base_model, load_tokenizer
from icu_peft.unlearner import _parts, forget, icu_step_backward


def _top_lora(model_dir, quantize=False):
    model = attach_lora(load_base_model(str(model_dir), quantize=quantize), 4, 8, 0.0, "all-linear", False, last_layers=1)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:  # LoRA B starts at zero; give the adapter a non-trivial state
            p.data.normal_(0, 0.05)
    return model


def _seqs(tok, texts):
    return [torch.tensor(tok(t)["input_ids"]) for t in texts]


@pytest.mark.parametrize("quantize", [False, True])
def test_prefix_backbone_gives_the_same_hidden_states_and_gradients(tiny_model_dir, tiny_corpus, quantize):
    tok = load_tokenizer(str(tiny_model_dir))
    model = _top_lora(tiny_model_dir, quantize)
    backbone = _parts(model)[0]
    pref = FrozenPrefixBackbone.build(backbone, max_bytes=1 << 24)
    assert pref is not None and pref.start == len(backbone.layers) - 1
    f, n = _seqs(tok, tiny_corpus["forget"][:2]), _seqs(tok, tiny_corpus["retain"][:5])
    ids, mask = pad_batch(f + n, tok.pad_token_id)
    with torch.no_grad():
        want = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        got = pref(ids, mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(want[real], got[real], atol=1e-5)
    model.train()
    cfg = ICUConfig(learn_weight=0.5, kl_weight=1.0, neighbour_micro_batch=2, forget_loss="ga")
    grads, outs = [], []
    for bb in (None, pref):
        model.zero_grad(set_to_none=True)
        outs.append(icu_step_backward(model, f, n, tok.pad_token_id, cfg, backbone=bb))
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    for k in ("loss", "l_fgt", "l_lrn", "l_kl"):
        assert outs[0][k] == pytest.approx(outs[1][k], rel=1e-4, abs=1e-6), k
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-3, atol=1e-6), k
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    assert pref.prefix.hits > 0  # the step re-used the prefix states of the first comparison


def test_scoring_through_the_prefix_backbone_gives_the_same_scores(tiny_model_dir, tiny_corpus):
    from icu_peft.metrics import backbone_and_head, backbone_override, next_token_stats, score_samples

    tok = load_tokenizer(str(tiny_model_dir))
    model = _top_lora(tiny_model_dir, quantize=True)
    model.eval()
    backbone = _parts(model)[0]
    pref = FrozenPrefixBackbone.build(backbone, max_bytes=1 << 24)
    seqs = _seqs(tok, tiny_corpus["forget"][:3] + tiny_corpus["unseen"][:3])
    plain = score_samples(model, seqs, tok.pad_token_id, el_n=4)
    plain_nll = next_token_stats(model, seqs, tok.pad_token_id)[0]
    with backbone_override(model, pref):
        assert backbone_and_head(model)[0] is pref
        cached = score_samples(model, seqs, tok.pad_token_id, el_n=4)
        cached_nll = next_token_stats(model, seqs, tok.pad_token_id)[0]
    assert backbone_and_head(model)[0] is backbone  # restored on leaving
    assert pref.prefix.misses == len(seqs) and pref.prefix.hits >= len(seqs)  # the second pass hit the cache
    assert cached.ma == plain.ma and cached.el == pytest.approx(plain.el)
    assert cached.nll == pytest.approx(plain.nll, abs=1e-5)
    for a, b in zip(plain_nll, cached_nll):
        assert torch.allclose(a, b, atol=1e-5)
    with backbone_override(model, None):  # no backbone: nothing changes
        assert backbone_and_head(model)[0] is backbone


def test_prefix_cache_is_off_when_nothing_below_is_frozen(tiny_model_dir):
    all_layers = attach_lora(load_base_model(str(tiny_model_dir), quantize=False), 4, 8, 0.0, "all-linear", False)
    assert first_trained_layer(_parts(all_layers)[0]) == 0
    assert FrozenPrefixBackbone.build(_parts(all_layers)[0], 1 << 24) is None
    full = load_base_model(str(tiny_model_dir), quantize=False)
    for p in full.parameters():
        p.requires_grad_(True)  # full fine-tuning: the embeddings train
    assert first_trained_layer(_parts(full)[0]) is None
    assert FrozenPrefixBackbone.build(_parts(_top_lora(tiny_model_dir))[0], 0) is None


def test_prefix_cache_is_off_when_the_split_changes_the_output(tiny_model_dir):
    """A model that post-processes inputs_embeds (Gemma scales them) cannot be split this way: detected."""
    backbone = _parts(_top_lora(tiny_model_dir))[0]
    plain = backbone.forward

    def scaled(input_ids=None, inputs_embeds=None, **kw):
        return plain(input_ids=input_ids, inputs_embeds=None if inputs_embeds is None else inputs_embeds * 2, **kw)

    backbone.forward = scaled
    assert FrozenPrefixBackbone.build(backbone, 1 << 24) is None
    del backbone.forward
    assert FrozenPrefixBackbone.build(backbone, 1 << 24) is not None


def test_forget_with_and_without_the_prefix_cache_trains_the_same_adapter(tiny_model_dir, tiny_corpus):
    runs = []
    for mb in (0, 64):
        r = forget(quick_config(tiny_model_dir, max_epochs=2, quantize=False, lora_layers=1, prefix_cache_mb=mb),
                   tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
        runs.append({n: p.detach().clone() for n, p in r.model.named_parameters() if "lora_" in n})
        cache = r.report["prefix_cache"]
        assert (cache is None) if mb == 0 else (cache["hits"] > 0 and cache["layers"] == 1), cache
    assert runs[0].keys() == runs[1].keys() and runs[0]
    for n in runs[0]:
        assert torch.allclose(runs[0][n], runs[1][n], atol=1e-4), n


def test_never_seen_scores_are_measured_once_per_base_precision_and_set(tiny_model_dir, tiny_corpus, tmp_path,
                                                                        monkeypatch):
    import json

    import icu_peft.unlearner as U
    from icu_peft.models import base_fingerprint, load_base_model, load_tokenizer

    from conftest import quick_config

    monkeypatch.setenv("ICU_PEFT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = U.score_samples
    monkeypatch.setattr(U, "score_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    tok = load_tokenizer(str(tiny_model_dir))
    unseen = tiny_corpus["unseen"]

    def measure(quantize, texts=unseen):
        cfg = quick_config(tiny_model_dir, quantize=quantize)
        model = load_base_model(str(tiny_model_dir), quantize=quantize)
        return U.measure_target(model, tok, texts, cfg, "00", fingerprint=base_fingerprint(model))

    first = measure(True)
    again = measure(True)
    assert len(calls) == 1  # the second request on the same base and set skipped the roll-outs
    assert again.band.to_dict() == first.band.to_dict() and again.thresholds.el == first.thresholds.el
    measure(False)  # full precision scores differently: measured anew
    measure(True, unseen[:-1])  # another never-seen set: measured anew
    assert len(calls) == 3
    # the files hold numbers only, never the text
    stored = " ".join(p.read_text() for p in (tmp_path / "cache" / "scores").glob("*.json"))
    assert stored and not any(t.split(": ")[1][:20] in stored for t in unseen)
    # a damaged file is measured again, not trusted
    for p in (tmp_path / "cache" / "scores").glob("*.json"):
        p.write_text("{not json")
    measure(True)
    assert len(calls) == 4
    def parses(p):
        try:
            return bool(json.loads(p.read_text()))
        except ValueError:
            return False

    assert sum(parses(p) for p in (tmp_path / "cache" / "scores").glob("*.json")) == 1  # rewritten whole


def _counted_base_scoring(tiny_model_dir, tmp_path, monkeypatch):
    """(calls, tokenizer, config, 4-bit tiny model) with an empty icu-peft cache and every score_samples call
    of the unlearner counted in `calls`."""
    import icu_peft.unlearner as U

    monkeypatch.setenv("ICU_PEFT_CACHE", str(tmp_path / "cache"))
    calls = []
    real = U.score_samples
    monkeypatch.setattr(U, "score_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls, load_tokenizer(str(tiny_model_dir)), quick_config(tiny_model_dir), load_base_model(
        str(tiny_model_dir), quantize=True)


def test_scores_taken_first_by_never_seen_scores_serve_the_request_band(tiny_model_dir, tiny_corpus, tmp_path,
                                                                       monkeypatch):
    """What the demo does: score its never-planted people through never_seen_scores (with a salt of its
    own), then file the request; the request's band reads those scores instead of rolling out again."""
    import icu_peft.unlearner as U
    from icu_peft.data import new_salt
    from icu_peft.models import base_fingerprint

    calls, tok, cfg, model = _counted_base_scoring(tiny_model_dir, tmp_path, monkeypatch)
    fresh = []
    tset = U.never_seen_tokens(tiny_corpus["unseen"], tok, cfg, new_salt())
    first = U.never_seen_scores(model, tset, tok.pad_token_id, cfg, base_fingerprint(model), computed=fresh)
    assert fresh == [True] and len(calls) == 1
    target = U.measure_target(model, tok, tiny_corpus["unseen"], cfg, new_salt(), fingerprint=base_fingerprint(model))
    assert len(calls) == 1  # read, not measured again
    assert target.band.el_hi == pytest.approx(max(first.el)) and target.thresholds.source == "unseen"
    fresh.clear()
    U.never_seen_scores(model, tset, tok.pad_token_id, cfg, base_fingerprint(model), computed=fresh)
    assert fresh == [] and len(calls) == 1


def test_the_demo_scores_its_planted_people_once_and_then_reads_them(tiny_model_dir, tiny_corpus, tmp_path, monkeypatch):
    """demo.run.base_scores: the planted people's MA / EL_n on the untouched base equal what measure_group
    measures itself; a second run reads them from the cache (no scoring) and gets the same numbers; a text a
    request would cut at max_length is left to measure_group (None)."""
    from icu_peft.demo.run import base_scores, measure_group

    calls, tok, cfg, model = _counted_base_scoring(tiny_model_dir, tmp_path, monkeypatch)
    texts = tiny_corpus["retain"][:3] + tiny_corpus["unseen"][:2]
    first = base_scores(model, tok, texts, cfg)
    assert len(calls) == 1
    again = base_scores(model, tok, texts, cfg)
    assert len(calls) == 1 and again == first
    own = measure_group(model, tok, texts, [], el_n=cfg.el_n)
    assert own["ma"] == pytest.approx(sum(first[0]) / len(texts), abs=1e-6)
    assert own["el"] == pytest.approx(sum(first[1]) / len(texts), abs=1e-6)
    short = ICUConfig(**{**cfg.__dict__, "max_length": 12})
    assert base_scores(model, tok, texts, short) is None


def test_the_reference_anchor_is_kept_per_sample_and_head_within_the_budget():
    from icu_peft.losses import reference_anchor

    torch.manual_seed(1)
    emb = torch.randn(30, 8)
    calls = []

    def reference(ids, mask):
        calls.append(ids.shape[0])
        return emb[ids] * mask[..., None]

    head, other = torch.nn.Linear(8, 30).requires_grad_(False), torch.nn.Linear(8, 30).requires_grad_(False)
    ids = torch.randint(30, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    cache = CachedReference(reference, 1 << 20)
    r, lse = cache.anchor(ids, mask, head)
    want_r, want_lse = reference_anchor(head, emb[ids[1, :4]])
    assert torch.allclose(r[1, :4], want_r) and torch.allclose(lse[1, :4], want_lse)
    assert (r[1, 4:] == 0).all() and (lse[1, 4:] == 0).all()  # the pads
    kept = len(cache.anchors)
    again = cache.anchor(ids[[1, 0]], mask[[1, 0]], head)  # the same rows in another batch: read, not made
    assert len(cache.anchors) == kept == 2 and torch.equal(again[0][0], r[1])
    cache.anchor(ids, mask, other)  # another head (another precision view's): its own rows
    assert len(cache.anchors) == 4
    # no anchor where it could not be kept (it would cost more than the logits), nor for a head that is not
    # a plain linear map, nor with the cache off
    assert CachedReference(reference, 200).anchor(ids, mask, head) is None
    assert CachedReference(reference, 1 << 20).anchor(ids, mask, torch.nn.Sequential(head)) is None
    assert CachedReference(reference, 0).anchor(ids, mask, head) is None


def test_forget_with_and_without_the_reference_anchor_trains_the_same_adapter(tiny_model_dir, tiny_corpus):
    runs = []
    for anchored in (False, True):
        r = forget(quick_config(tiny_model_dir, max_epochs=2, quantize=False, kl_anchor=anchored),
                   tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
        runs.append({n: p.detach().clone() for n, p in r.model.named_parameters() if "lora_" in n})
    assert runs[0].keys() == runs[1].keys() and runs[0]
    for n in runs[0]:
        assert torch.allclose(runs[0][n], runs[1][n], atol=1e-4), n
