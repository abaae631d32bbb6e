"""CodeUnlearn beyond one codebook: bottlenecks on several layers, the SAE variant, answer-position selection."""

from __future__ import annotations

import json

import pytest
import torch

from icu_peft.codebook import (CodebookConfig, CodeForgetConfig, forget_topic, load_codebook_model, read_code_mask,
                               read_codebook, revoke_mask, stack_masks, train_codebook, verify_dir)
from icu_peft.codebook.api import split_codes
from icu_peft.codebook.forget import (NAME_STANDINS, NEUTRAL_WORDS, aligned_pairs, answer_positions, dependent_positions,
                                      grow_mask, make_contrast, mask_modes)
from icu_peft.codebook.layer import combine_codes
from icu_peft.codebook.sae import SAELayer, fraction_unexplained, sae_decode, sae_encode, train_sae
from icu_peft.errors import InputError, IntegrityError

from test_codebook import CFG, TOPIC_WORDS, _change, detach, general_text, logits, one_thread, topic_sentences  # noqa: F401 (one_thread: autouse)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from icu_peft.models import load_base_model, load_tokenizer

    return load_base_model(str(tiny_model_dir), quantize=False), load_tokenizer(str(tiny_model_dir))


# ------------------------------------------------------------------------------ pure functions


def test_sae_encode_decode_by_hand():
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[2.0, 0.5], [-3.0, 0.0]])
    vals, idx = sae_encode(x, w, torch.zeros(3), torch.zeros(2), k=2)
    # row 0: activations (2, 0.5, 0) -> top-2 features 0 and 1; row 1: (0, 0, 3) -> feature 2, then nothing (-1)
    assert idx.tolist() == [[0, 1], [2, -1]]
    assert vals.tolist() == [[2.0, 0.5], [3.0, 0.0]]
    assert sae_decode(vals, idx, w, torch.zeros(2)).tolist() == [[2.0, 0.5], [-3.0, 0.0]]
    assert float(fraction_unexplained(x, x)) == 0.0


def test_negated_codes_add_their_opposite():
    cb = torch.eye(3)
    neg = torch.tensor([False, True, False])
    assert combine_codes(cb, torch.tensor([[0, 1]]), "sum", negated=neg).tolist() == [[1.0, -1.0, 0.0]]


def test_split_codes_maps_global_ids_to_stages():
    assert split_codes([0, 5, 8, 15], 8, 2) == [[0, 5], [0, 7]]
    with pytest.raises(InputError):
        split_codes([16], 8, 2)


def test_aligned_pairs_and_answer_positions_by_hand():
    # topic: BOS Z is V . ; contrast: BOS thing is V .  (token ids; 7 = the topic word, 9 = its stand-in)
    topic, contrast = [1, 7, 3, 5, 6], [1, 9, 3, 5, 6]
    pairs = aligned_pairs(topic, contrast)
    # positions holding the same token in a common run, with a next token: BOS, "is", "V"
    assert pairs == [(0, 0), (2, 2), (3, 3)]
    t_nll = [5.0, 0.1, 0.2]   # the topic's next tokens (Z, V, .) after the topic's prefixes
    c_nll = [5.0, 3.0, 0.3]   # the same tokens after the contrast's: "V" after "thing is" is 2.9 nats less likely
    assert answer_positions(pairs, t_nll, c_nll, margin=1.0) == ([2], [2])
    assert answer_positions(pairs, t_nll, c_nll, margin=5.0) == ([], [])
    # a longer stand-in shifts the contrast's positions; another answer (8) leaves "is" aligned
    assert aligned_pairs([1, 7, 3, 5, 6], [1, 9, 9, 3, 5, 6]) == [(0, 0), (2, 3), (3, 4)]
    assert aligned_pairs([1, 7, 3, 5, 6], [1, 9, 3, 8, 6]) == [(0, 0), (2, 2)]


def test_train_sae_fits_sparse_data():
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(16, 8, generator=g)
    coef = torch.rand(2000, 16, generator=g) * (torch.rand(2000, 16, generator=g) < 0.15)
    x = 40.0 * (coef @ dirs)  # hidden-state-like scale: the SAE works on x / scale
    layer, stats = train_sae(x, num_features=32, k=4, steps=300, batch_tokens=256, lr=1e-2, dead_interval=50, seed=0)
    assert stats["fvu_held_out"] < 0.35, stats
    assert stats["scale"] > 10
    assert not any(p.requires_grad for p in layer.parameters())
    with pytest.raises(InputError):
        train_sae(x[:1], 32, 4, 1, 8, 1e-3)


# ------------------------------------------------------------------------------ SAE on the tiny model

SAE_CFG = dict(CFG, kind="sae", learning_rate=1e-2, steps=200, sae_tokens=2000, sae_batch_tokens=256, layers=[0, 1])
for _k in ("recovery_lora_r", "layer"):
    SAE_CFG.pop(_k)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, base):
    model, tok = base
    out = tmp_path_factory.mktemp("sae") / "sae"
    res = train_codebook(CodebookConfig(**SAE_CFG), general_text(), model, tok, output_dir=out)
    return out, res


def test_sae_config_needs_no_recovery():
    cfg = CodebookConfig(kind="sae")
    assert (cfg.recovery_lora_r, cfg.learning_rate) == (0, 1e-3)
    assert CodebookConfig(kind="codes").recovery_lora_r == 8 and CodebookConfig(kind="codes").learning_rate == 0.05
    with pytest.raises(InputError, match="recovery_lora_r must be 0"):
        CodebookConfig(kind="sae", recovery_lora_r=4)
    with pytest.raises(InputError):
        CodebookConfig(kind="sparse")
    with pytest.raises(InputError):
        CodebookConfig(layers=[])


def test_unmasked_sae_is_the_base_exactly_and_reloads(sae_dir, base):
    out, res = sae_dir
    model, tok = base
    assert res.layer_indices == [0, 1]
    assert all(st["fvu_held_out"] < 0.9 for st in res.manifest["training"]["sae"]), res.manifest["training"]["sae"]
    text = topic_sentences(3, seed=99)
    plain, _ = logits(model, tok, text)
    load_codebook_model(model, out)
    try:
        assert len(model.icu_codebook.layers) == 2
        assert all(isinstance(layer, SAELayer) for layer in model.icu_codebook.layers)
        with_sae, _ = logits(model, tok, text)
    finally:
        detach(model)
    assert torch.equal(with_sae, plain)
    cb = read_codebook(out)
    assert cb.total_codes == 2 * SAE_CFG["num_codes"] and cb.config.kind == "sae"
    for a, b in zip(cb.build_layers(), res.layers):
        for name, t in b.tensors().items():
            assert torch.equal(a.tensors()[name], t.float()), name


@pytest.fixture(scope="module")
def sae_mask(tmp_path_factory, sae_dir, base):
    model, tok = base
    mask_dir = tmp_path_factory.mktemp("sae_masks") / "topic"
    res = forget_topic(CodeForgetConfig(select="test", max_p=0.01, request_id="sae-req"), model, tok, sae_dir[0],
                       topic_sentences(24, seed=21), topic_words=TOPIC_WORDS, output_dir=mask_dir)
    return mask_dir, res


@pytest.mark.parametrize("mode", ["zero", "negate"])
def test_sae_clamp_hits_topic_more_than_contrast(sae_mask, sae_dir, base, mode):
    mask_dir, res = sae_mask
    model, tok = base
    assert res.codes, "no topic feature was selected"
    stages = {c // SAE_CFG["num_codes"] for c in res.codes}
    assert stages == {0, 1}, res.codes  # one request masks features in both layers
    held_out = topic_sentences(12, seed=77)
    on_topic = _change(model, tok, held_out, sae_dir[0], [mask_dir], mode)
    on_contrast = _change(model, tok, make_contrast(held_out, TOPIC_WORDS), sae_dir[0], [mask_dir], mode)
    assert on_topic > 2 * on_contrast, (on_topic, on_contrast)


def test_sae_masks_follow_the_mask_contract(tmp_path, sae_mask, sae_dir, base):
    mask_dir, res = sae_mask
    model, tok = base
    text = json.dumps(read_code_mask(mask_dir).manifest)
    assert not any(w in text for w in TOPIC_WORDS)
    other = forget_topic(CodeForgetConfig(select="test", max_p=0.05, request_id="other"), model, tok, sae_dir[0],
                         topic_sentences(16, seed=5), topic_words=["raven"], output_dir=tmp_path / "other")
    st = stack_masks([mask_dir, tmp_path / "other"], tmp_path / "st")
    assert st["codes"] == sorted(set(res.codes) | set(other.codes))
    rv = revoke_mask(tmp_path / "st", ["other"], tmp_path / "rv")
    assert rv["codes"] == res.codes
    assert verify_dir(tmp_path / "rv")["kind"] == "code_mask"
    with pytest.raises(InputError, match="cannot be blocked"):
        load_codebook_model(model, sae_dir[0], [mask_dir], mode="block")
    assert not hasattr(model, "icu_codebook")
    with pytest.raises(InputError, match="cannot be blocked"):
        forget_topic(CodeForgetConfig(mode="block"), model, tok, sae_dir[0], topic_sentences(4, seed=1),
                     topic_words=TOPIC_WORDS)


def test_tampered_sae_file_refused(tmp_path, sae_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(sae_dir[0], bad)
    t = load_file(str(bad / "codebook.safetensors"))
    t.pop("stage1.scale")
    save_file(t, str(bad / "codebook.safetensors"))
    with pytest.raises(IntegrityError):
        read_codebook(bad)  # the hash no longer matches
    from icu_peft.adapters import read_manifest, write_manifest

    m = read_manifest(bad)
    for k in ("files", "manifest_sha256"):
        m.pop(k, None)
    write_manifest(bad, m)  # re-hashed: now the layout itself must be refused
    with pytest.raises(IntegrityError, match="holds"):
        read_codebook(bad)


# ------------------------------------------------------------------------------ codebooks on several layers


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory, base):
    model, tok = base
    out = tmp_path_factory.mktemp("multi") / "cb"
    cfg = dict(CFG, layers=[1, 0])
    cfg.pop("layer")
    res = train_codebook(CodebookConfig(**cfg), general_text(), model, tok, output_dir=out)
    return out, res


def test_multi_layer_codebook_masks_topic_codes_in_each_layer(tmp_path, multi_dir, base):
    out, res = multi_dir
    model, tok = base
    assert res.layer_indices == [0, 1]
    cb = read_codebook(out)
    assert cb.layer_indices == [0, 1] and cb.total_codes == 2 * CFG["num_codes"]
    mask = forget_topic(CodeForgetConfig(select="test", max_p=0.01, request_id="m"), model, tok, out, topic_sentences(24, seed=21),
                        topic_words=TOPIC_WORDS, output_dir=tmp_path / "mask")
    assert {c // CFG["num_codes"] for c in mask.codes} == {0, 1}, mask.codes
    held_out = topic_sentences(12, seed=77)
    on_topic = _change(model, tok, held_out, out, [tmp_path / "mask"])
    on_contrast = _change(model, tok, make_contrast(held_out, TOPIC_WORDS), out, [tmp_path / "mask"])
    assert on_topic > 2 * on_contrast, (on_topic, on_contrast)
    # each stage sees only its own ids
    load_codebook_model(model, out, [tmp_path / "mask"])
    try:
        h = model.icu_codebook
        n = CFG["num_codes"]
        assert sorted(h.layers[0].zeroed.nonzero().squeeze(-1).tolist()) == [c for c in mask.codes if c < n]
        assert sorted((h.layers[1].zeroed.nonzero().squeeze(-1) + n).tolist()) == [c for c in mask.codes if c >= n]
    finally:
        detach(model)


def test_repeated_layers_refused(base):
    model, tok = base
    cfg = dict(CFG, layers=[1, -1])
    cfg.pop("layer")
    with pytest.raises(InputError, match="same decoder layer twice"):
        train_codebook(CodebookConfig(**cfg), general_text(), model, tok)


# ------------------------------------------------------------------------------ answer positions

COUNTRIES = {"zorbania": ["velk", "dram", "owl", "tin"], "quellmark": ["sarn", "plo", "fox", "salt"],
             "ostravia": ["mirr", "kest", "elk", "jade"]}
TEMPLATES = ["the capital of {c} is {a} .", "the coin of {c} is the {a} .", "the animal of {c} is the {a} .",
             "the export of {c} is {a} ."]


def facts(country):
    return [t.format(c=country, a=a) for t, a in zip(TEMPLATES, COUNTRIES[country])]


@pytest.fixture(scope="module")
def countries_model(tmp_path_factory):
    """A tiny model that memorised facts whose answers only the country's name tells apart."""
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.testing import build_tiny_memorizer

    d = tmp_path_factory.mktemp("countries")
    texts = [f for c in COUNTRIES for f in facts(c)]
    build_tiny_memorizer(d, texts * 4, ["the thing of item is part ."], steps=300)
    return load_base_model(str(d), quantize=False), load_tokenizer(str(d)), d


def test_answer_positions_find_where_the_name_is_read(tmp_path, countries_model):
    model, tok = countries_model[:2]
    cfg = dict(CFG, layers=[0, 1], num_codes=32, kmeans_tokens=200, steps=30)
    cfg.pop("layer")
    corpus = [f for c in COUNTRIES for f in facts(c)] * 6
    train_codebook(CodebookConfig(**cfg), corpus, model, tok, output_dir=tmp_path / "cb")
    # the contrast: the kept countries' facts of the same form, one per topic text
    topic = facts("zorbania") * 2
    contrast = facts("quellmark") + facts("ostravia")
    res = forget_topic(CodeForgetConfig(select="test", positions="both", max_p=0.05, min_count=2, request_id="z"), model, tok,
                       tmp_path / "cb", topic, contrast_texts=contrast, output_dir=tmp_path / "mask")
    counted = res.stats["positions_counted"]
    # the answer tokens follow "is" / "the": the topic's prefix predicts them, another country's cannot
    assert counted["answers"]["topic"] >= 4 and counted["answers"]["topic"] == counted["answers"]["contrast"]
    assert counted["all"]["topic"] > counted["answers"]["topic"]
    kept = res.stats["kept"]
    assert {r["positions"] for r in kept} <= {"all", "answers"} and any(r["positions"] == "answers" for r in kept)
    # the mask raises the requested country's facts' NLL more than the kept countries'
    from icu_peft.codebook.evaluate import lm_scores, truncated

    def nll(country, masks):
        load_codebook_model(model, tmp_path / "cb", masks)
        try:
            return lm_scores(model, truncated(tok, facts(country), 32), tok.pad_token_id)["nll"]
        finally:
            detach(model)

    rise = {c: nll(c, [tmp_path / "mask"]) - nll(c, []) for c in COUNTRIES}
    # (a 2-layer toy whose bare codebooks recall the facts only in part: a clear but not a wide margin)
    assert rise["zorbania"] > 1.3 * max(rise["quellmark"], rise["ostravia"], 0.01), rise
    with pytest.raises(InputError, match="aligns each topic text"):
        forget_topic(CodeForgetConfig(positions="answers"), model, tok, tmp_path / "cb", facts("zorbania"),
                     contrast_texts=facts("quellmark")[:2])


def test_cli_trains_a_two_layer_sae_and_masks_with_answer_positions(tmp_path, tiny_model_dir, capsys):
    from icu_peft.cli import main

    data = tmp_path / "general.txt"
    data.write_text("\n".join(general_text()) + "\n")
    topic = tmp_path / "topic.txt"
    topic.write_text("\n".join(topic_sentences(16, seed=31)) + "\n")
    m, sae = str(tiny_model_dir), tmp_path / "sae"
    assert main(["-q", "codebook", "train", "--model", m, "--no-quantize", "--data", str(data), "--out", str(sae),
                 "--layers", "0,1", "--num-codes", "32",  # the SAE: the default kind "--k", "4", "--steps", "50",
                 "--sae-tokens", "500", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SAE written" in out and "layers 0,1" in out and "fraction of variance unexplained" in out
    assert main(["-q", "codebook", "forget", "--model", m, "--no-quantize", "--codebook", str(sae), "--topic", str(topic),
                 "--topic-words", ",".join(TOPIC_WORDS), "--out", str(tmp_path / "mask"), "--max-p", "0.05",
                 "--mode", "negate", "--positions", "both", "--select", "test"]) == 0
    mask = read_code_mask(tmp_path / "mask")
    assert mask.mode == "negate" and mask.requests[0]["selection"]["config"]["positions"] == "both"
    capsys.readouterr()
    assert main(["-q", "codebook", "inspect", str(sae)]) == 0
    d = json.loads(capsys.readouterr().out)[0]
    assert (d["bottleneck"], d["layers"]) == ("sae", [0, 1])
    # bad input: one line, exit 2, nothing written
    assert main(["-q", "codebook", "train", "--model", m, "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--layers", "0,x"]) == 2
    assert main(["-q", "codebook", "train", "--model", m, "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--kind", "sae", "--recovery-lora-r", "4"]) == 2
    assert main(["-q", "codebook", "forget", "--model", m, "--no-quantize", "--codebook", str(sae), "--topic", str(topic),
                 "--topic-words", "quartz", "--out", str(tmp_path / "bad"), "--mode", "block"]) == 2
    assert not (tmp_path / "bad").exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_make_contrast_is_the_same_in_every_process():
    """Equal-length topic words used to take their neutral words in the set's (hash-seeded) order."""
    import subprocess
    import sys

    code = ("from icu_peft.codebook.forget import make_contrast; "
            "print(make_contrast(['Zorbania speaks Zorbanic and Quellish'], ['Zorbania', 'Zorbanic', 'Quellish'])[0])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(outs) == 1, outs


# ------------------------------------------------------------------------------ the 'auto' selection


def test_dependent_positions_by_hand():
    topic = [5, 9, 7, 3]  # next tokens 9, 7, 3
    pairs = [(0, 0), (1, 2), (2, 3)]
    # the topic predicts 9 and 3 (positions 0 and 2), not 7; the contrast predicts 9 at its position 0 too
    assert dependent_positions(topic, [9, 1, 3, 0], [9, 0, 0, 1], pairs) == [2]
    assert dependent_positions(topic, [9, 1, 3, 0], [9, 0, 0, 3], pairs) == []  # the contrast says 3 as well
    assert dependent_positions(topic, [0, 0, 0, 0], [0, 0, 0, 0], pairs) == []


def test_grow_mask_adds_until_nothing_is_said_and_skips_what_does_damage():
    # each code silences the predictions in its set; code 4 also breaks kept text
    silences = {1: {0}, 2: set(), 3: {1, 2}, 4: {3}, 5: {3}, 6: {0}}

    def still_said(codes):
        return 4 - len(set().union(*(silences[c] for c in codes)))

    def damage(codes):
        return int(4 in codes)

    g = grow_mask([1, 2, 4, 3, 5, 6], still_said, damage, dependent=4, progress=True)
    assert (g.codes, g.left, g.tried, g.skipped) == ([1, 2, 3, 5], 0, 5, 1)  # stops before 6: nothing left to say
    assert g.to_dict()["kept"] == 4
    capped = grow_mask([1, 2, 4, 3, 5, 6], still_said, damage, dependent=4, max_codes=2)
    assert (capped.codes, capped.left) == ([1], 3)  # 2 silenced nothing
    none = grow_mask([], still_said, damage, dependent=4)
    assert (none.codes, none.left, none.tried) == ([], 4, 0)
    # codes after the last one that silenced anything are dropped: 2 acts with nothing, 6 only repeats 1
    trimmed = grow_mask([1, 2, 6], still_said, damage, dependent=4)
    assert (trimmed.codes, trimmed.left, trimmed.tried) == ([1], 3, 3)
    useless = grow_mask([2], still_said, damage, dependent=4)
    assert (useless.codes, useless.left) == ([], 4)


def test_mask_modes_try_negate_only_where_kept_text_can_show_its_damage():
    assert mask_modes("auto", "auto", has_keep=True) == ["zero", "negate"]
    assert mask_modes("auto", "auto", has_keep=False) == ["zero"]
    assert mask_modes("auto", "test", has_keep=True) == ["zero"]
    assert mask_modes("negate", "auto", has_keep=False) == ["negate"]


def test_make_contrast_puts_invented_names_in_place_of_names():
    out = make_contrast(["Zorbania exports salt to Quellmark; zorbanic glass"], ["Zorbania", "zorbanic", "Brenholt"])[0]
    first = out.split()[0]
    assert first in NAME_STANDINS and first != "Brenholt"  # a stand-in that is a topic word is never used
    assert out.split()[-2] in NEUTRAL_WORDS and "Quellmark" in out
    plain = make_contrast(["Zorbania exports salt"], ["Zorbania"], names=None)[0]
    assert plain.split()[0] in NEUTRAL_WORDS


@pytest.fixture(scope="module")
def countries_sae(tmp_path_factory, countries_model):
    model, tok = countries_model[:2]
    out = tmp_path_factory.mktemp("csae") / "sae"
    cfg = dict(SAE_CFG, layers=[0], num_codes=64, k=8)
    train_codebook(CodebookConfig(**cfg), [f for c in COUNTRIES for f in facts(c)] * 6, model, tok, output_dir=out)
    return out


def test_auto_selection_removes_name_dependent_predictions_and_spares_kept_text(tmp_path, countries_model, countries_sae):
    from icu_peft.codebook.forget import predictions

    model, tok = countries_model[:2]
    keep = facts("quellmark") + facts("ostravia")
    topic = facts("zorbania")
    # (a 2-layer toy with few name-dependent predictions on few positions: a wider pool than the default's)
    res = forget_topic(CodeForgetConfig(request_id="auto", pool_p=0.5, min_count=1, min_ratio=1.0), model, tok,
                       countries_sae, topic, topic_words=["zorbania"],
                       keep_texts=keep, output_dir=tmp_path / "mask")
    req = res.manifest["requests"][0]
    search = res.stats["search"]
    assert search["dependent_predictions"] > 0 and search["keep_texts"] == len(keep)
    assert search["left"] < search["dependent_predictions"] and res.codes
    assert req["status"] == ("forgotten" if search["left"] == 0 else "partial")
    assert search["kept"] == len(res.codes) <= search["candidates_tried"]
    # zero first; negate only because zero left something (keep texts given), and the mask acts as the search chose
    assert search["modes_tried"] == (["zero"] if search["left"] == 0 and search["mode"] == "zero" else ["zero", "negate"])
    assert res.manifest["mode"] == search["mode"] == read_code_mask(tmp_path / "mask").mode

    def hits(texts, masks):
        seqs = [torch.tensor(tok(t)["input_ids"]) for t in texts]
        load_codebook_model(model, countries_sae, masks)
        try:
            return [p[:-1] == s[1:] for s, p in zip(seqs, predictions(model, seqs, tok.pad_token_id, 8))]
        finally:
            detach(model)

    # the kept countries lose no correct prediction (the search skipped any code that took one)
    before, after = hits(keep, []), hits(keep, [tmp_path / "mask"])
    assert all(bool((b & ~a).sum() == 0) for b, a in zip(before, after))
    # and the requested country loses some
    assert sum(int(h.sum()) for h in hits(topic, [tmp_path / "mask"])) < sum(int(h.sum()) for h in hits(topic, []))
    # the mask file holds no text and no count a holder of the base could recompute from a candidate text
    written = (tmp_path / "mask" / "forget_manifest.json").read_text()
    assert "zorbania" not in written.lower()
    for key in ("positions_counted", "topic_positions", "topic_count", "contrast_count", "dependent_predictions",
                "active_on_topic"):
        assert key not in written, key
    assert "positions" not in req["topic"] and "positions" not in req["contrast"]
    assert req["selection"]["mode"] == search["mode"] and req["selection"]["keep_texts"] == len(keep)
    # 'auto' pairs each topic text with its contrast text
    with pytest.raises(InputError, match="one contrast text per topic text"):
        forget_topic(CodeForgetConfig(), model, tok, countries_sae, topic, contrast_texts=keep[:2])


def test_cli_forget_exit_status_follows_the_search(tmp_path, countries_model, countries_sae, capsys):
    from icu_peft.cli import main

    d = countries_model[2]
    topic, keep = tmp_path / "topic.txt", tmp_path / "keep.txt"
    topic.write_text("\n".join(facts("zorbania")) + "\n")
    keep.write_text("\n".join(facts("quellmark") + facts("ostravia")) + "\n")
    args = ["-q", "codebook", "forget", "--model", str(d), "--no-quantize", "--codebook", str(countries_sae),
            "--topic", str(topic), "--topic-words", "zorbania", "--keep", str(keep)]
    # no candidate at all: every name-dependent prediction is left, the mask is written and marked partial
    assert main(args + ["--out", str(tmp_path / "none"), "--pool-p", "1e-12"]) == 3
    assert read_code_mask(tmp_path / "none").requests[0]["status"] == "partial"
    assert "partial:" in capsys.readouterr().out
    assert main(["-q", "codebook", "inspect", str(tmp_path / "none")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["requests"][0]["status"] == "partial"
    code = main(args + ["--out", str(tmp_path / "auto")])
    status = read_code_mask(tmp_path / "auto").requests[0]["status"]
    assert code == {"forgotten": 0, "partial": 3, "not_name_bound": 3}[status]
    # a topic word whose text nothing is predicted from (it comes last): nothing name-bound, an empty mask, exit 3
    plain = tmp_path / "plain.txt"
    plain.write_text("the capital of the town is velk .\n")
    assert main(args[:8] + ["--topic", str(plain), "--topic-words", "velk", "--out", str(tmp_path / "plain")]) == 3
    req = read_code_mask(tmp_path / "plain").requests[0]
    assert (req["status"], req["codes"]) == ("not_name_bound", [])
    assert "not name-bound" in capsys.readouterr().out
    # keep texts with the test rule: refused before any work (the test never reads them)
    assert main(args + ["--out", str(tmp_path / "bad"), "--select", "test"]) == 2
    assert not (tmp_path / "bad").exists() and "select 'auto' only" in capsys.readouterr().err
    # the test rule writes no status and exits 0
    assert main(args[:-2] + ["--out", str(tmp_path / "test"), "--select", "test", "--max-p", "0.05"]) == 0
    assert "status" not in read_code_mask(tmp_path / "test").requests[0]
