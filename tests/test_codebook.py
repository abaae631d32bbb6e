"""CodeUnlearn on a tiny model: the bottleneck math, training/reload, topic masks, mask lifecycle, CLI."""

from __future__ import annotations

import argparse
import json
import random
import shutil

import pytest
import torch

from icu_peft.codebook import (CodebookConfig, CodeForgetConfig, describe, forget_topic, load_codebook_model,
                               read_code_mask, read_codebook, revoke_mask, stack_masks, train_codebook, verify_dir)
from icu_peft.adapters import read_manifest
from icu_peft.codebook.api import write_code_mask
from icu_peft.codebook.forget import chi2_2x2, chi2_sf_1df, make_contrast, select_topic_codes
from icu_peft.codebook.layer import CodebookLayer, combine_codes, kmeans, topk_codes
from icu_peft.errors import ICUError, InputError, IntegrityError
from icu_peft.testing import WORDS, random_sentences

TOPIC_WORDS = ["quartz", "raven", "saffron"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core machine run several times faster on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def topic_sentences(n, seed):
    """Sentences of the tiny vocabulary where every third word is a topic word."""
    rng = random.Random(seed)
    others = [w for w in WORDS if w not in TOPIC_WORDS]
    return [" ".join(rng.choice(TOPIC_WORDS) if i % 3 == 1 else rng.choice(others) for i in range(12)) + "."
            for _ in range(n)]


def general_text():
    return random_sentences(40, seed=11) + topic_sentences(20, seed=12)


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from icu_peft.models import load_base_model, load_tokenizer

    return load_base_model(str(tiny_model_dir), quantize=False), load_tokenizer(str(tiny_model_dir))


CFG = dict(kind="codes", num_codes=64, k=4, steps=60, batch_size=8, max_length=32, kmeans_tokens=400, dead_code_interval=20,
           progress=False, learning_rate=3e-3, layer=1, recovery_lora_r=0)  # the bare bottleneck; recovery tests set it


@pytest.fixture(scope="module")
def codebook_dir(tmp_path_factory, base):
    model, tok = base
    out = tmp_path_factory.mktemp("codebook") / "cb"
    # The residual site explicitly: these tests were written for it (the mlp site has its own below).
    res = train_codebook(CodebookConfig(site="residual", **CFG), general_text(), model, tok, output_dir=out)
    assert not hasattr(model, "icu_codebook")
    return out, res


def logits(model, tok, texts):
    from icu_peft.data import pad_batch

    ids, mask = pad_batch([torch.tensor(tok(t)["input_ids"]) for t in texts], tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits, mask


def detach(model):
    if hasattr(model, "icu_codebook"):
        model.icu_codebook.remove()
        del model.icu_codebook


# ------------------------------------------------------------------------------ pure functions


def _in_memory_and_reloaded(model, tok, res, out, site, text):
    """Logits of `text` with the freshly trained codebook attached at `site`, then with it reloaded from `out`."""
    from icu_peft.codebook.layer import attach

    hook = attach(model, res.layer, res.layer_index, site)
    mem, _ = logits(model, tok, text)
    hook.remove()
    load_codebook_model(model, out)
    disk, _ = logits(model, tok, text)
    detach(model)
    return mem, disk


def test_chi2_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    a, b = torch.tensor([30, 5, 0, 12]), torch.tensor([10, 5, 4, 12])
    n_a, n_b = 200, 180
    mine = chi2_2x2(a, n_a, b, n_b)
    for i in range(4):
        table = [[int(a[i]), n_a - int(a[i])], [int(b[i]), n_b - int(b[i])]]
        want = stats.chi2_contingency(table, correction=False)[0]
        assert float(mine[i]) == pytest.approx(want, rel=1e-6)
    x = torch.tensor([0.0, 1.0, 3.84, 10.0, 40.0], dtype=torch.double)
    assert torch.allclose(chi2_sf_1df(x), torch.tensor(stats.chi2.sf(x.numpy(), 1)), rtol=1e-6)


def test_select_topic_codes_keeps_only_significant_enriched_codes():
    topic = torch.tensor([100, 100, 2, 50, 0, 30])
    contrast = torch.tensor([5, 100, 0, 0, 40, 28])
    codes, rows = select_topic_codes(topic, 1000, contrast, 1000, min_ratio=2.0, max_p=1e-3, bonferroni=True, min_count=3)
    # 0: 20x and significant; 1: same frequency; 2: too rare; 3: enriched; 4: depleted; 5: no difference
    assert codes == [0, 3]
    assert rows[0]["code"] == 3  # highest ratio first (contrast 0 -> 51x vs 100/6)
    capped, _ = select_topic_codes(topic, 1000, contrast, 1000, max_codes=1)
    assert capped == [3]
    none, _ = select_topic_codes(topic, 1000, contrast, 1000, min_ratio=1000.0)
    assert none == []
    with pytest.raises(InputError):
        select_topic_codes(topic, 0, contrast, 1000)


def test_make_contrast_swaps_whole_words_consistently():
    out = make_contrast(["Quartz and quartzite, QUARTZ raven.", "nothing here"], ["quartz", "raven"])
    a, b = out[0].split()[0], out[0].split()[3]
    assert "quartzite" in out[0] and "raven" not in out[0].lower()
    assert a == b.rstrip(",")  # the same topic word always gets the same neutral word
    assert out[1] == "nothing here"
    longest = make_contrast(["the Zorblat Republic"], ["Zorblat", "Zorblat Republic"])[0]
    assert longest.count(" ") == 1  # the two-word name was replaced as one
    with pytest.raises(InputError, match="none of the topic words"):
        make_contrast(["amber basalt"], ["quartz"])


def test_topk_blocks_and_combine_zeroes():
    cb = torch.eye(4)
    h = torch.tensor([[1.0, 0.5, 0.2, 0.0]])
    assert topk_codes(h @ cb.T, 2).tolist() == [[0, 1]]
    blocked = torch.tensor([True, False, False, False])
    assert topk_codes(h @ cb.T, 2, blocked).tolist() == [[1, 2]]  # the next best takes the place
    zeroed = torch.tensor([True, False, False, False])
    out = combine_codes(cb, torch.tensor([[0, 1]]), "sum", zeroed)
    assert out.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    assert combine_codes(cb, torch.tensor([[0, 1]]), "mean").tolist() == [[0.5, 0.5, 0.0, 0.0]]


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[10.0, 0, 0], [0, 10.0, 0], [0, 0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 3, generator=g) for c in centers])
    got = kmeans(x, 3, iters=10, similarity="cosine", seed=1)
    dist = torch.cdist(centers, got).min(1).values
    assert float(dist.max()) < 0.5


def test_layer_mask_rejects_bad_ids():
    layer = CodebookLayer(8, 4, k=2)
    with pytest.raises(InputError):
        layer.set_mask([8])
    with pytest.raises(InputError):
        layer.set_mask(range(7), mode="block")  # fewer than k codes left to choose from
    layer.set_mask(range(7))  # zero (the default) still chooses them: any number may be zeroed
    assert int(layer.zeroed.sum()) == 7 and not layer.blocked.any()


# ------------------------------------------------------------------------------ train / reload


def test_codebook_trains_reloads_identically_and_beats_its_init(codebook_dir, base):
    out, res = codebook_dir
    model, tok = base
    p = res.manifest["perplexity"]
    assert p["codebook"]["nll"] < p["kmeans_init"]["nll"]  # training helped
    assert p["codebook"]["nll"] >= p["base"]["nll"] - 0.5  # and it is still a bottleneck, not magic
    text = topic_sentences(3, seed=99)
    plain, _ = logits(model, tok, text)
    # trained layer (in memory) vs. reloaded from disk: identical
    mem, disk = _in_memory_and_reloaded(model, tok, res, out, "residual", text)
    assert torch.equal(mem, disk)
    assert not torch.allclose(mem, plain)  # the bottleneck is really in the path
    again, _ = logits(model, tok, text)
    assert torch.equal(again, plain)  # removing the hook restores the base exactly


def test_codebook_model_works_with_metrics_and_generation(codebook_dir, base):
    from icu_peft.metrics import extraction_likelihood, teacher_forced

    out, _ = codebook_dir
    model, tok = base
    seqs = [torch.tensor(tok(t)["input_ids"]) for t in topic_sentences(2, seed=5)]
    plain = teacher_forced(model, seqs, tok.pad_token_id)
    load_codebook_model(model, out)
    try:
        tf = teacher_forced(model, seqs, tok.pad_token_id)
        el = extraction_likelihood(model, seqs, 3, tok.pad_token_id, tf=tf)
    finally:
        detach(model)
    assert not torch.equal(tf.target_logprobs, plain.target_logprobs)  # the backbone path sees the hook too
    assert all(0.0 <= e <= 1.0 for e in el)


# ------------------------------------------------------------------------------ forgetting


@pytest.fixture(scope="module")
def topic_mask(tmp_path_factory, codebook_dir, base):
    out, _ = codebook_dir
    model, tok = base
    mask_dir = tmp_path_factory.mktemp("masks") / "topic"
    cfg = CodeForgetConfig(select="test", min_ratio=2.0, max_p=0.01, request_id="topic-req")
    res = forget_topic(cfg, model, tok, out, topic_sentences(24, seed=21), topic_words=TOPIC_WORDS, output_dir=mask_dir)
    return mask_dir, res


def _change(model, tok, texts, cb_dir, mask_dirs, mode=None):
    load_codebook_model(model, cb_dir)
    ref, mask = logits(model, tok, texts)
    load_codebook_model(model, cb_dir, mask_dirs, mode=mode)
    got, _ = logits(model, tok, texts)
    detach(model)
    lp_ref, lp = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


@pytest.mark.parametrize("mode", ["block", "zero"])
def test_masking_topic_codes_hits_topic_text_more_than_contrast(topic_mask, codebook_dir, base, mode):
    mask_dir, res = topic_mask
    model, tok = base
    assert res.codes, "no topic code was selected"
    held_out = topic_sentences(12, seed=77)  # not the texts the codes were selected on
    contrast = make_contrast(held_out, TOPIC_WORDS)
    on_topic = _change(model, tok, held_out, codebook_dir[0], [mask_dir], mode)
    on_contrast = _change(model, tok, contrast, codebook_dir[0], [mask_dir], mode)
    assert on_topic > 2 * on_contrast, (on_topic, on_contrast)


def test_mask_manifest_holds_no_text(topic_mask):
    mask_dir, _ = topic_mask
    raw = (mask_dir / "forget_manifest.json").read_text()
    for sentence in topic_sentences(24, seed=21)[:5]:
        assert sentence not in raw and sentence.split()[0] + " " + sentence.split()[1] not in raw
    m = read_code_mask(mask_dir)
    assert m.request_ids == ["topic-req"] and len(m.requests[0]["topic"]["ids"]) == 24


def test_empty_mask_is_identity(tmp_path, topic_mask, codebook_dir, base):
    mask_dir, _ = topic_mask
    model, tok = base
    empty = tmp_path / "empty"
    revoke_mask(mask_dir, ["topic-req"], empty)
    assert read_code_mask(empty).codes == []
    texts = topic_sentences(4, seed=3)
    load_codebook_model(model, codebook_dir[0])
    ref, _ = logits(model, tok, texts)
    load_codebook_model(model, codebook_dir[0], [empty])
    got, _ = logits(model, tok, texts)
    detach(model)
    assert torch.equal(ref, got)


# ------------------------------------------------------------------------------ lifecycle


def _mask(tmp_path, name, codes, topic_mask, mode="block"):
    m = read_code_mask(topic_mask[0]).manifest
    write_code_mask([{"request_id": name, "codes": codes}], mode, m["codebook"], m["base"], tmp_path / name)
    return tmp_path / name


def test_stack_and_revoke_behave_as_sets(tmp_path, topic_mask):
    a = _mask(tmp_path, "a", [1, 2, 3], topic_mask)
    b = _mask(tmp_path, "b", [3, 4], topic_mask)
    c = _mask(tmp_path, "c", [9], topic_mask)
    stack_masks([a, b], tmp_path / "ab")
    stack_masks([b, a], tmp_path / "ba")
    assert read_code_mask(tmp_path / "ab").codes == read_code_mask(tmp_path / "ba").codes == [1, 2, 3, 4]
    revoke_mask(tmp_path / "ab", ["b"], tmp_path / "ab-b")
    assert read_code_mask(tmp_path / "ab-b").codes == [1, 2, 3]  # 3 is still wanted by a
    revoke_mask(tmp_path / "ab", ["a"], tmp_path / "ab-a")
    assert read_code_mask(tmp_path / "ab-a").codes == [3, 4]
    stack_masks([tmp_path / "ab", a], tmp_path / "aba")  # stacking a request twice changes nothing
    assert read_code_mask(tmp_path / "aba").request_ids == ["a", "b"]
    stack_masks([tmp_path / "ab", c], tmp_path / "abc")
    revoke_mask(tmp_path / "abc", ["a", "c"], tmp_path / "abc-ac")
    assert read_code_mask(tmp_path / "abc-ac").codes == [3, 4]
    with pytest.raises(InputError, match="holds no request"):
        revoke_mask(tmp_path / "ab", ["zzz"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    z = _mask(tmp_path, "z", [5], topic_mask, mode="zero")
    with pytest.raises(InputError, match="disagree"):
        stack_masks([a, z], tmp_path / "az")
    stack_masks([a, z], tmp_path / "az", mode="zero")
    assert read_code_mask(tmp_path / "az").mode == "zero"


def test_stacked_masks_equal_union_at_load(tmp_path, topic_mask, codebook_dir, base):
    model, tok = base
    a = _mask(tmp_path, "a", [1, 2], topic_mask)
    b = _mask(tmp_path, "b", [2, 7], topic_mask)
    stack_masks([a, b], tmp_path / "ab")
    texts = topic_sentences(3, seed=8)
    load_codebook_model(model, codebook_dir[0], [a, b])
    assert model.icu_codebook.codes == [1, 2, 7]
    two, _ = logits(model, tok, texts)
    load_codebook_model(model, codebook_dir[0], [tmp_path / "ab"])
    one, _ = logits(model, tok, texts)
    detach(model)
    assert torch.equal(one, two)


def test_tampered_or_foreign_files_refused(tmp_path, topic_mask, codebook_dir, base):
    model, _ = base
    cb = tmp_path / "cb"
    shutil.copytree(codebook_dir[0], cb)
    mask = tmp_path / "mask"
    shutil.copytree(topic_mask[0], mask)
    # a flipped byte in the codebook weights
    w = cb / "codebook.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        load_codebook_model(model, cb)
    # a manifest whose code list no longer matches the weights file
    man = json.loads((mask / "forget_manifest.json").read_text())
    man["requests"][0]["codes"] = man["requests"][0]["codes"][1:]
    (mask / "forget_manifest.json").write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="edited"):
        read_code_mask(mask)
    # the same edit by someone who also recomputed the manifest digest: the weights still disagree
    from icu_peft.adapters import manifest_digest

    man["manifest_sha256"] = manifest_digest(man)
    (mask / "forget_manifest.json").write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="do not match"):
        read_code_mask(mask)
    # a mask for another codebook
    other = _mask(tmp_path, "other", [1], topic_mask)
    man = json.loads((other / "forget_manifest.json").read_text())
    man["codebook"]["sha256"] = "0" * 64
    man["manifest_sha256"] = manifest_digest(man)
    (other / "forget_manifest.json").write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="another codebook"):
        load_codebook_model(model, codebook_dir[0], [other])
    # a codebook trained on another base
    cb2 = tmp_path / "cb2"
    shutil.copytree(codebook_dir[0], cb2)
    man = json.loads((cb2 / "forget_manifest.json").read_text())
    man["base"]["fingerprint"]["sha256"] = "f" * 64
    man["manifest_sha256"] = manifest_digest(man)
    (cb2 / "forget_manifest.json").write_text(json.dumps(man))
    with pytest.raises(IntegrityError, match="different base"):
        load_codebook_model(model, cb2)
    load_codebook_model(model, cb2, force=True)
    detach(model)
    # a pickle dropped into the directory
    (tmp_path / "cb3").mkdir()
    shutil.copytree(codebook_dir[0], tmp_path / "cb3" / "x")
    (tmp_path / "cb3" / "x" / "extra.bin").write_bytes(b"\x80\x04")
    with pytest.raises(IntegrityError):
        read_codebook(tmp_path / "cb3" / "x")
    # a LoRA forget adapter is not a codebook
    with pytest.raises(IntegrityError, match="not a code mask"):
        read_code_mask(codebook_dir[0])
    assert not hasattr(model, "icu_codebook")


def test_describe_and_verify(codebook_dir, topic_mask):
    from icu_peft.models import base_fingerprint

    d = describe(codebook_dir[0])
    assert d["kind"] == "codebook" and d["num_codes"] == 64 and d["perplexity"]["codebook"]["ppl"] > 0
    m = describe(topic_mask[0])
    assert m["kind"] == "code_mask" and m["num_codes_masked"] == len(topic_mask[1].codes)
    assert verify_dir(topic_mask[0])["kind"] == "code_mask"


# ------------------------------------------------------------------------------ CLI


def test_cli_end_to_end(tmp_path, tiny_model_dir, capsys):
    from icu_peft.cli import main

    data = tmp_path / "general.txt"
    data.write_text("\n".join(general_text()) + "\n")
    topic = tmp_path / "topic.txt"
    topic.write_text("\n".join(topic_sentences(16, seed=31)) + "\n")
    m = str(tiny_model_dir)
    cb = tmp_path / "cb"
    # 4-bit base (the default) for training
    assert main(["-q", "codebook", "train", "--model", m, "--data", str(data), "--out", str(cb), "--kind", "codes", "--num-codes", "32",
                 "--k", "4", "--steps", "10", "--max-length", "32", "--kmeans-tokens", "200", "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["-q", "codebook", "forget", "--model", m, "--no-quantize", "--codebook", str(cb), "--topic", str(topic),
                 "--topic-words", ",".join(TOPIC_WORDS), "--out", str(tmp_path / "mask"), "--max-p", "0.05",
                 "--request-id", "r1", "--select", "test"]) == 0
    code = main(["-q", "codebook", "forget", "--model", m, "--no-quantize", "--codebook", str(cb), "--topic", str(topic),
                 "--topic-words", "quartz", "--out", str(tmp_path / "mask2"), "--request-id", "r2", "--mode", "zero"])
    # select auto (the default): the exit status says whether the search left name-dependent predictions
    status = read_code_mask(tmp_path / "mask2").requests[0]["status"]
    assert code == {"forgotten": 0, "partial": 3, "not_name_bound": 3}[status]
    assert main(["-q", "codebook", "stack", str(tmp_path / "mask"), str(tmp_path / "mask2"), "--out", str(tmp_path / "st")]) == 0
    assert main(["-q", "codebook", "revoke", str(tmp_path / "st"), "--request-id", "r2", "--out", str(tmp_path / "rv")]) == 0
    assert read_code_mask(tmp_path / "rv").codes == read_code_mask(tmp_path / "mask").codes
    assert main(["-q", "codebook", "verify", str(cb), str(tmp_path / "rv"), "--codebook", str(cb), "--model", m]) == 0
    capsys.readouterr()
    assert main(["-q", "codebook", "inspect", str(tmp_path / "st")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["requests"][1]["request_id"] == "r2"
    assert main(["-q", "codebook", "eval", "--model", m, "--no-quantize", "--codebook", str(cb), "--mask",
                 str(tmp_path / "st"), "--data", f"topic={topic}"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["sets"]["topic"]["ppl"] > 1 and res["masked_codes"] == len(read_code_mask(tmp_path / "st").codes)
    # user errors: one line, exit 2, nothing written
    assert main(["-q", "codebook", "forget", "--model", m, "--codebook", str(cb), "--topic", str(topic),
                 "--topic-words", "notaword", "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert main(["-q", "codebook", "train", "--model", m, "--data", str(tmp_path / "missing.txt"),
                 "--out", str(tmp_path / "bad")]) == 2
    assert main(["-q", "codebook", "train", "--model", m, "--data", str(data), "--out", str(cb)]) == 2  # exists
    assert main(["-q", "codebook", "eval", "--model", m, "--mask", str(tmp_path / "st"), "--data", str(topic)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert issubclass(IntegrityError, ICUError)


def test_eval_accepts_a_codebook_and_masks(topic_mask, codebook_dir, tiny_model_dir, tiny_files, capsys):
    """`icu-peft eval --codebook DIR --code-mask DIR` scores the bottlenecked, masked model."""
    import json as _json

    from icu_peft.cli import main

    cb_dir, mask_dir = codebook_dir[0], topic_mask[0]
    common = ["eval", "--model", str(tiny_model_dir), "--data", str(tiny_files["forget"]), "--metrics", "ma",
              "--json"]
    assert main(common) == 0
    plain = _json.loads(capsys.readouterr().out)["ma"]
    assert main(common + ["--codebook", str(cb_dir), "--code-mask", str(mask_dir)]) == 0
    masked = _json.loads(capsys.readouterr().out)["ma"]
    assert masked != plain
    assert main(common + ["--code-mask", str(mask_dir)]) == 2
    assert "--code-mask needs --codebook" in capsys.readouterr().err


def test_massive_positions_pass_through_unsnapped_and_uncounted():
    """An attention-sink-like position (norm far above the rest) keeps its hidden state and gets no code."""
    from icu_peft.codebook.layer import massive_positions

    torch.manual_seed(0)
    h = torch.randn(2, 6, 16)
    h[0, 0] *= 200.0  # the sink
    through = massive_positions(h, 10.0)
    assert through.tolist() == [[True] + [False] * 5, [False] * 6]
    assert massive_positions(h, 0.0) is None

    layer = CodebookLayer(num_codes=8, dim=16, k=2)
    layer.record = []
    snapped_all = layer(h)
    layer.passthrough_ratio = 10.0
    out = layer(h)
    assert torch.equal(out[0, 0], h[0, 0])  # passed through untouched
    assert not torch.equal(snapped_all[0, 0], h[0, 0])  # (without the ratio it was snapped)
    assert torch.equal(out[0, 1:], snapped_all[0, 1:]) and torch.equal(out[1], snapped_all[1])
    idx = layer.record[-1]
    assert (idx[0, 0] == -1).all() and (idx[0, 1:] >= 0).all() and (idx[1] >= 0).all()


# ------------------------------------------------------------------------------ sites (residual, mlp, attention)


def _kmeans_layer(model, tok, site, layer_index=1):
    """An untrained codebook at `site`, initialised by k-means on that site's outputs (cheap, no training)."""
    from icu_peft.codebook.evaluate import windows
    from icu_peft.codebook.train import collect_hidden

    seqs = windows(tok, general_text(), 32)
    hidden = collect_hidden(model, seqs, tok.pad_token_id, layer_index, 400, site=site)
    layer = CodebookLayer(32, hidden.shape[1], k=4)
    with torch.no_grad():
        layer.weight.copy_(kmeans(hidden, 32, iters=5, seed=0))
    return layer


@pytest.mark.parametrize("site", ["residual", "mlp", "attention"])
def test_each_site_changes_outputs_and_detaching_restores_exactly(base, site):
    from icu_peft.codebook.layer import attach, capture, site_module

    model, tok = base
    assert type(site_module(model, 1, site)).__name__.endswith(
        {"residual": "DecoderLayer", "mlp": "MLP", "attention": "Attention"}[site])
    layer = _kmeans_layer(model, tok, site)
    texts = topic_sentences(3, seed=41)
    plain, _ = logits(model, tok, texts)
    seen = []
    spy = capture(model, 1, seen, site)  # registered first: sees the site's output before it is snapped
    hook = attach(model, layer, 1, site)
    layer.keep_last = True
    snapped, _ = logits(model, tok, texts)
    layer.keep_last = False
    hook.remove()
    spy.remove()
    assert torch.equal(layer.last[0], seen[0])  # the codebook snapped exactly this site's output
    assert not torch.allclose(snapped, plain)
    again, _ = logits(model, tok, texts)
    assert torch.equal(again, plain)


def test_sub_layer_sites_snap_a_different_tensor_than_the_residual(base):
    """At mlp/attention the codes live in the sub-layer's output space, not the residual stream's."""
    from icu_peft.codebook.evaluate import windows
    from icu_peft.codebook.train import collect_hidden

    model, tok = base
    seqs = windows(tok, general_text()[:8], 32)
    got = {s: collect_hidden(model, seqs, tok.pad_token_id, 1, 10_000, site=s) for s in ("residual", "mlp", "attention")}
    assert got["residual"].shape == got["mlp"].shape == got["attention"].shape
    assert not torch.allclose(got["residual"], got["mlp"]) and not torch.allclose(got["mlp"], got["attention"])


def test_sites_resolve_on_gpt2_too():
    """Generic sub-module lookup: GPT-2 names them `mlp` and `attn` (the attention returns a tuple)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from icu_peft.codebook.layer import attach, site_module

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    assert site_module(model, 0, "mlp") is model.transformer.h[0].mlp
    assert site_module(model, 0, "attention") is model.transformer.h[0].attn
    assert site_module(model, 0, "residual") is model.transformer.h[0]
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids).logits
        layer = CodebookLayer(16, 32, k=2)
        hook = attach(model, layer, 0, "attention")
        snapped = model(ids).logits
        hook.remove()
        again = model(ids).logits
    assert not torch.allclose(snapped, plain) and torch.equal(again, plain)


def test_bad_site_is_an_input_error(base, tmp_path, tiny_model_dir, capsys):
    from torch import nn

    from icu_peft.cli import main
    from icu_peft.codebook.layer import site_module

    model, _ = base
    with pytest.raises(InputError, match="site"):
        CodebookConfig(site="ffn")
    with pytest.raises(InputError, match="unknown codebook site"):
        site_module(model, 0, "ffn")

    class Bare(nn.Module):  # decoder layers without named sub-modules
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    with pytest.raises(InputError, match="has no mlp sub-module"):
        site_module(Bare(), 0, "mlp")
    with pytest.raises(InputError, match="has no attention sub-module"):
        site_module(Bare(), 1, "attention")
    assert site_module(Bare(), 1, "residual") is not None
    data = tmp_path / "general.txt"
    data.write_text("\n".join(general_text()) + "\n")
    with pytest.raises(SystemExit) as exit_:  # argparse refuses an unknown choice before loading anything
        main(["codebook", "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "cb"),
              "--site", "ffn"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "cb").exists()


def test_cli_site_choices_are_the_library_sites():
    # The CLI spells the choices out so that parsing does not import torch; they must not drift apart.
    from icu_peft.cli import build_parser
    from icu_peft.codebook.layer import SITES

    def subparsers(p):
        return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices

    train = subparsers(subparsers(build_parser())["codebook"])["train"]
    site = next(a for a in train._actions if a.dest == "site")
    assert list(site.choices) == list(SITES)


@pytest.fixture(scope="module")
def mlp_codebook_dir(tmp_path_factory, base):
    model, tok = base
    out = tmp_path_factory.mktemp("codebook-mlp") / "cb"
    res = train_codebook(CodebookConfig(site="mlp", **CFG), general_text(), model, tok, output_dir=out)
    return out, res


def test_mlp_site_is_saved_reloaded_and_masking_hits_topic_more_than_contrast(tmp_path, mlp_codebook_dir, base):
    out, res = mlp_codebook_dir
    model, tok = base
    assert read_codebook(out).config.site == "mlp" and describe(out)["site"] == "mlp"
    p = res.manifest["perplexity"]
    assert p["codebook"]["nll"] < p["kmeans_init"]["nll"]
    # the reloaded codebook sits at the mlp: identical to the in-memory one attached there
    mem, disk = _in_memory_and_reloaded(model, tok, res, out, "mlp", topic_sentences(3, seed=99))
    assert torch.equal(mem, disk)
    # zero-shot forget at the mlp site, as in test_masking_topic_codes_hits_topic_text_more_than_contrast
    mask_dir = tmp_path / "mask"
    cfg = CodeForgetConfig(select="test", min_ratio=2.0, max_p=0.01, request_id="topic-mlp")
    fr = forget_topic(cfg, model, tok, out, topic_sentences(24, seed=21), topic_words=TOPIC_WORDS, output_dir=mask_dir)
    assert fr.codes, "no topic code was selected at the mlp site"
    assert read_code_mask(mask_dir).manifest["codebook"]["site"] == "mlp"
    held_out = topic_sentences(12, seed=77)
    on_topic = _change(model, tok, held_out, out, [mask_dir])
    on_contrast = _change(model, tok, make_contrast(held_out, TOPIC_WORDS), out, [mask_dir])
    assert on_topic > 2 * on_contrast, (on_topic, on_contrast)


def test_codebook_saved_before_sites_loads_as_residual(tmp_path, mlp_codebook_dir, base):
    """Old codebook dirs have no `site` in codebook_config.json: they snapped the residual stream,
    whatever the field's default is now."""
    from icu_peft.adapters import write_manifest
    from icu_peft.codebook.layer import attach

    model, tok = base
    old = tmp_path / "old"
    shutil.copytree(mlp_codebook_dir[0], old)
    cfg = json.loads((old / "codebook_config.json").read_text())
    for key in ("site", "kind", "layers", "layer_indices", "sae_tokens", "sae_batch_tokens"):  # none existed then
        del cfg[key]
    (old / "codebook_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_manifest(old, read_manifest(old))  # re-hash, as the pre-site code would have written it
    cb = read_codebook(old)
    assert (cb.config.site, cb.config.kind, cb.layer_indices) == ("residual", "codes", [cb.layer_index])
    texts = topic_sentences(3, seed=5)
    hook = attach(model, cb.build_layer(), cb.layer_index, "residual")
    want, _ = logits(model, tok, texts)
    hook.remove()
    load_codebook_model(model, old)
    got, _ = logits(model, tok, texts)
    load_codebook_model(model, mlp_codebook_dir[0])
    at_mlp, _ = logits(model, tok, texts)
    detach(model)
    assert torch.equal(want, got) and not torch.allclose(got, at_mlp)


# ------------------------------------------------------------------------------ recovery LoRA


@pytest.fixture(scope="module")
def recovery_codebook_dir(tmp_path_factory, base):
    model, tok = base
    out = tmp_path_factory.mktemp("codebook-recovery") / "cb"
    # Layer 0 of the 2-layer tiny model, so that there is a decoder layer after the bottleneck to adapt.
    cfg = CodebookConfig(site="residual", recovery_learning_rate=3e-3, **dict(CFG, steps=20, layer=0, recovery_lora_r=4))
    res = train_codebook(cfg, general_text(), model, tok, output_dir=out)
    return out, res


def _has_lora(model) -> bool:
    return any("lora_" in name for name, _ in model.named_modules())


def test_recovery_lora_is_saved_reloaded_identically_and_detached_exactly(recovery_codebook_dir, base):
    from safetensors.torch import load_file

    out, res = recovery_codebook_dir
    model, tok = base
    assert not _has_lora(model) and not hasattr(model, "peft_config")  # training left the base as it was
    files = read_manifest(out)["files"]
    assert "recovery/adapter_model.safetensors" in files and "recovery/adapter_config.json" in files
    lora = load_file(str(out / "recovery" / "adapter_model.safetensors"))
    assert lora and all(".layers.1." in k for k in lora)  # only the layer after the bottleneck
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # it trained (B starts at zero)
    assert res.manifest["recovery"]["layers"] == [1, 1] and describe(out)["recovery_lora_r"] == 4

    text = topic_sentences(3, seed=99)
    plain, _ = logits(model, tok, text)
    load_codebook_model(model, out)
    assert _has_lora(model)
    with_recovery, _ = logits(model, tok, text)
    load_codebook_model(model, out)  # replacing an attached codebook also replaces its recovery LoRA
    again, _ = logits(model, tok, text)
    # the same codebook without the LoRA: the LoRA really is in the path
    from icu_peft.codebook.layer import attach

    model.icu_codebook.remove()
    hook = attach(model, read_codebook(out).build_layer(), 0, "residual")
    codes_only, _ = logits(model, tok, text)
    hook.remove()
    detach(model)
    after, _ = logits(model, tok, text)
    assert torch.equal(with_recovery, again)
    assert not torch.allclose(with_recovery, codes_only)
    assert torch.equal(after, plain) and not _has_lora(model)  # detaching restores the base exactly


def test_recovery_codebook_masks_and_forgets_as_before(tmp_path, recovery_codebook_dir, base):
    out, _ = recovery_codebook_dir
    model, tok = base
    mask_dir = tmp_path / "mask"
    forget_topic(CodeForgetConfig(select="test", min_ratio=1.0, max_p=1.0, bonferroni=False, max_codes=4, request_id="r"),
                 model, tok, out, topic_sentences(12, seed=21), topic_words=TOPIC_WORDS, output_dir=mask_dir)
    assert not _has_lora(model)  # forget_topic detaches what it attached
    text = topic_sentences(3, seed=5)
    load_codebook_model(model, out)
    unmasked, _ = logits(model, tok, text)
    load_codebook_model(model, out, [mask_dir])
    masked, _ = logits(model, tok, text)
    detach(model)
    assert read_code_mask(mask_dir).codes and not torch.allclose(unmasked, masked)


def test_tampered_or_missing_recovery_adapter_refused(tmp_path, recovery_codebook_dir, base):
    from safetensors.torch import load_file, save_file

    out, _ = recovery_codebook_dir
    model, _ = base
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    w = load_file(str(bad / "recovery" / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_B" in k)
    w[key] = w[key] + 0.1
    save_file(w, str(bad / "recovery" / "adapter_model.safetensors"))
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        load_codebook_model(model, bad)
    assert not _has_lora(model) and not hasattr(model, "icu_codebook")
    # dropping the adapter and its manifest entries does not turn it into a plain codebook
    gone = tmp_path / "gone"
    shutil.copytree(out, gone)
    shutil.rmtree(gone / "recovery")
    m = read_manifest(gone)
    m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("recovery/")}
    from icu_peft.adapters import manifest_digest

    m["manifest_sha256"] = manifest_digest(m)
    (gone / "forget_manifest.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="recovery"):
        read_codebook(gone)


def test_recovery_needs_a_layer_after_the_bottleneck(base):
    model, tok = base
    with pytest.raises(InputError, match="after the bottleneck"):
        train_codebook(CodebookConfig(site="residual", **dict(CFG, steps=1, layer=-1, recovery_lora_r=4)),
                       general_text(), model, tok)
    assert not _has_lora(model)


def test_default_layer_is_a_tenth_of_the_way_up():
    from torch import nn

    from icu_peft.codebook.layer import resolve_layer

    class Stack(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": n})()
            self.layers = nn.ModuleList([nn.Linear(2, 2) for _ in range(n)])

    assert [resolve_layer(Stack(n), None) for n in (2, 12, 30, 32)] == [0, 1, 3, 3]
    assert resolve_layer(Stack(30), -1) == 29 and resolve_layer(Stack(30), 15) == 15
    with pytest.raises(InputError, match="out of range"):
        resolve_layer(Stack(30), 30)
    cfg = CodebookConfig()  # the SAE: the recipe that forgot most on the planted countries (CODEUNLEARN.md)
    assert (cfg.kind, cfg.site, cfg.layer, cfg.recovery_lora_r, cfg.num_codes, cfg.steps) == ("sae", "residual", None, 0, 2048, 1500)
    codes = CodebookConfig(kind="codes")
    assert (codes.recovery_lora_r, codes.num_codes, codes.steps, codes.learning_rate) == (8, 1024, 300, 0.05)
    assert (CodeForgetConfig().mode, CodeForgetConfig().bonferroni) == ("auto", False)


def test_forget_config_select_rule_is_checked():
    assert (CodeForgetConfig().select, CodeForgetConfig().pool_p) == ("auto", 0.2)
    with pytest.raises(InputError, match="select must be one of"):
        CodeForgetConfig(select="greedy")
    for bad in (0.0, 1.5):
        with pytest.raises(InputError, match="pool_p"):
            CodeForgetConfig(pool_p=bad)
