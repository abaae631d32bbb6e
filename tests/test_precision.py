"""The full-precision view (precision.py): an adapter trained on a 4-bit base must also forget merged."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from conftest import quick_config

from icu_peft.metrics import Scores


def test_scores_concat_then_split_gives_the_parts_back():
    a = Scores(ma=[0.1, 0.2], el=[None, 0.3], nll=[1.0, 2.0])
    b = Scores(ma=[0.5, 0.6], el=[0.0, 0.1], nll=[3.0, 4.0])
    both = Scores.concat([a, b])
    assert both.ma == [0.1, 0.2, 0.5, 0.6] and both.el == [None, 0.3, 0.0, 0.1] and both.bleu is None
    assert both.split(2) == [a, b]
    assert Scores.concat([a]) is a


@pytest.fixture(scope="module")
def views(tiny_model_dir):
    """(4-bit model with a fresh adapter, its precision view)."""
    from icu_peft import ICUConfig
    from icu_peft.models import attach_lora, load_base_model
    from icu_peft.precision import build_view

    trained = attach_lora(load_base_model(str(tiny_model_dir), quantize=True, compute_dtype="float32"))
    view = build_view(ICUConfig(model=str(tiny_model_dir), compute_dtype="float32"), trained, torch.device("cpu"))
    return trained, view


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merged_view_of_an_untrained_adapter_is_the_4bit_load(views):
    trained, view = views
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    q = _logits(trained, ids)
    assert not torch.allclose(_logits(view.model, ids), q, atol=1e-3)  # full precision differs from NF4 ...
    view.merged.refresh()
    with view.as_view(1) as m:
        assert torch.allclose(_logits(m, ids), q, atol=1e-4)  # ... and NF4(W + 0) is the 4-bit load exactly
    assert view.names() == ["float32", "nf4_merged"]


def test_view_shares_the_adapter_and_its_merged_nf4_is_a_saved_merge_reloaded(views, tmp_path):
    from icu_peft.attacks import load_quantized
    from icu_peft.precision import tie_lora

    trained, view = views
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    before = _logits(view.model, ids)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # train "by hand": the view must see it, since it holds the same tensors
        for n, p in trained.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    assert not torch.allclose(_logits(view.model, ids), before, atol=1e-4)
    view.merged.refresh()
    with view.as_view(1) as m:
        ours = _logits(m, ids)
    merged = copy.deepcopy(view.model).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    reloaded = load_quantized(tmp_path / "merged", "nf4")
    assert torch.allclose(ours, _logits(reloaded, ids), atol=1e-4)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.zero_()
    with pytest.raises(RuntimeError, match="tied 0 of"):  # a model without the adapter's layout
        tie_lora(view.model, torch.nn.Linear(2, 2))


def test_between_refreshes_the_merged_view_follows_the_adapter(views):
    """Training steps between two refreshes see NF4(W + delta at the refresh) plus what the adapter moved
    since (drift): much closer to a fresh re-quantization than the refresh-time value alone, which held
    the merged view's forget term on stale numbers for a whole round."""
    trained, view = views
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(4)
    lora_b = [p for n, p in trained.named_parameters() if p.requires_grad and "lora_B" in n]
    try:
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        view.merged.refresh()
        with torch.no_grad():  # a round's worth of training, by hand
            for p in lora_b:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
        with view.as_view(1) as m:
            followed = _logits(m, ids)
            snapshot, view.merged.snapshot = view.merged.snapshot, {}
            stale = _logits(m, ids)  # the value as it was before drift existed
            view.merged.snapshot = snapshot
        view.merged.refresh()
        with view.as_view(1) as m:
            fresh = _logits(m, ids)
        # mean, not max: a re-quantization also re-rounds weights near a bin edge, which no drift foresees
        err, err_stale = (followed - fresh).abs().mean(), (stale - fresh).abs().mean()
        assert err_stale > 1e-3 and err < 0.75 * err_stale  # measured: 0.53 here, 0.23 on a 12-record memoriser
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
        view.merged.refresh()


def test_each_view_keeps_the_kept_text_against_its_own_base(views):
    """view_retain: the retain terms' KL in the full-precision view compares with the full-precision base
    (adapter off); in the merged NF4 view with the 4-bit base, since switching the adapter off there
    leaves it merged in (a KL to the model itself, which holds nothing)."""
    from types import SimpleNamespace

    from icu_peft import ICUConfig
    from icu_peft.unlearner import _parts, _Run, adapter_disabled_reference

    trained, view = views
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    lora_b = [p for n, p in trained.named_parameters() if p.requires_grad and "lora_B" in n]
    four_bit = adapter_disabled_reference(trained)
    run = SimpleNamespace(view=view, reference=four_bit, config=ICUConfig(), view_refs=None,
                          view_names=lambda: ["nf4"] + view.names())
    try:
        with torch.no_grad():
            for p in lora_b:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(6)) * 0.05)
        view.merged.refresh()

        def hidden(model):
            with torch.no_grad():
                return _parts(model)[0](input_ids=ids, attention_mask=mask).last_hidden_state

        with torch.no_grad():
            with view.model.disable_adapter():
                fp_base = hidden(view.model)
            with view.as_view(1):
                merged_self = adapter_disabled_reference(view.model)(ids, mask)
            base4 = four_bit(ids, mask)
        assert _Run.view_reference(run, 0) is four_bit
        with view.as_view(0):
            got = _Run.view_reference(run, 1)(ids, mask)
        assert torch.allclose(got, fp_base, atol=1e-5) and not torch.allclose(got, hidden(view.model), atol=1e-3)
        assert _Run.view_reference(run, 1) is _Run.view_reference(run, 1)  # built once (cached)
        assert _Run.view_reference(run, 2) is four_bit
        # what the naive reference would have been in the merged view: the adapter still in, not the base
        assert not torch.allclose(merged_self, base4, atol=1e-3)
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
        view.merged.refresh()


@pytest.mark.parametrize("view_retain", [True, False])
def test_the_retain_terms_go_through_the_other_view_only_with_view_retain(tiny_model_dir, tiny_corpus, monkeypatch,
                                                                          view_retain):
    """Each step's first backward pass is the trained view's (forget and retain terms), the second another
    precision view's: with view_retain it carries the same kept text, without it the forget term alone."""
    import icu_peft.unlearner as U

    calls, real = [], U.icu_step_backward

    def spy(model, forget_seqs, neighbour_seqs, *a, **k):
        calls.append((id(model), len(neighbour_seqs)))
        return real(model, forget_seqs, neighbour_seqs, *a, **k)

    monkeypatch.setattr(U, "icu_step_backward", spy)
    U.forget(quick_config(tiny_model_dir, max_steps=2, min_epochs=0, precision_check="on", view_retain=view_retain),
             tiny_corpus["forget"][:2], tiny_corpus["retain"], tiny_corpus["unseen"])
    assert len(calls) == 4  # two steps, two passes each
    trained, other = calls[0::2], calls[1::2]
    assert all(n > 0 for _, n in trained) and {m for m, _ in trained}.isdisjoint({m for m, _ in other})
    assert all((n > 0) == view_retain for _, n in other)


def test_on_a_gpt2_conv1d_model_the_merged_view_is_a_saved_merge_reloaded(tmp_path):
    """GPT-2's projections are transformers' Conv1D (weights stored (in, out)): the merged view must
    quantize them too, adapter included (it once skipped them and ran the plain base)."""
    from icu_peft import ICUConfig
    from icu_peft.attacks import load_quantized
    from icu_peft.models import attach_lora, load_base_model
    from icu_peft.precision import build_view
    from icu_peft.testing import build_tiny_memorizer

    texts = [f"member {i} lives at {i * 7} elm street" for i in range(6)]
    build_tiny_memorizer(tmp_path / "gpt2", texts, steps=2, arch="gpt2")
    trained = attach_lora(load_base_model(str(tmp_path / "gpt2"), quantize=True, compute_dtype="float32"))
    view = build_view(ICUConfig(model=str(tmp_path / "gpt2"), compute_dtype="float32"), trained, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(3, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    view.merged.refresh()
    with view.as_view(1) as m:
        ours = _logits(m, ids)
    assert not torch.allclose(ours, _logits(view.model, ids), atol=1e-3)  # quantized, not the fp32 view
    merged = copy.deepcopy(view.model).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged", safe_serialization=True)
    assert torch.allclose(ours, _logits(load_quantized(tmp_path / "merged", "nf4"), ids), atol=1e-4)


def test_the_view_is_built_only_where_it_is_wanted(tiny_model_dir, monkeypatch):
    from icu_peft import ICUConfig
    from icu_peft import precision
    from icu_peft.models import load_base_model

    cpu = torch.device("cpu")
    q = load_base_model(str(tiny_model_dir), quantize=True, compute_dtype="float32")
    fp = load_base_model(str(tiny_model_dir), quantize=False, compute_dtype="float32")
    cfg = ICUConfig(model=str(tiny_model_dir))
    assert precision.wanted(cfg, q, cpu) is None
    assert "off" in precision.wanted(ICUConfig(model=str(tiny_model_dir), precision_check="off"), q, cpu)
    assert "not quantized" in precision.wanted(cfg, fp, cpu)
    assert "no model path" in precision.wanted(ICUConfig(), q, cpu)
    # a packed 4-bit weight counts as the weights it stands for
    assert precision.parameter_count(q) == precision.parameter_count(fp)
    monkeypatch.setattr(precision, "free_memory_bytes", lambda device: 1000)
    assert "does not fit" in precision.wanted(cfg, q, cpu)
    assert precision.wanted(ICUConfig(model=str(tiny_model_dir), precision_check="on"), q, cpu) is None
    with pytest.raises(Exception, match="precision_check"):
        ICUConfig(precision_check="maybe")


def test_forget_trains_and_reports_every_precision(tiny_forget_adapter, capsys):
    from icu_peft.adapters import read_manifest

    m = read_manifest(tiny_forget_adapter)
    p = m["precisions"]
    assert p["trained_on"] == "nf4" and set(p["checked"]) == {"nf4", "float32", "nf4_merged"}
    # "forgotten" is the verdict over every precision: a sample missed in one is not forgotten
    assert m["forget"]["forgotten"] <= min(v["forgotten"] for v in p["checked"].values())
    assert m["status"] != "forgotten" or all(v["forgotten"] == m["forget"]["count"] for v in p["checked"].values())
    # the loop took the forget term through the other precisions too
    assert any("l_fgt_view" in h for h in m["history"])
    # the model card and `inspect` say where it was checked
    card = (tiny_forget_adapter / "README.md").read_text()
    n = m["forget"]["count"]
    assert f"merged and reloaded in NF4 {p['checked']['nf4_merged']['forgotten']}/{n}" in card
    from icu_peft.cli import main

    assert main(["inspect", str(tiny_forget_adapter)]) == 0
    assert f"the 4-bit base {p['checked']['nf4']['forgotten']}/{n}" in capsys.readouterr().out


def test_a_memoriser_that_nf4_rounding_half_forgets_stays_forgotten_merged(tmp_path):
    """The failure this module exists for: on a 48-wide memoriser NF4 rounding of the base alone moves
    the forget set's loss by ~1 nat. An adapter calibrated against the 4-bit weights only left the
    full-precision merge remembering (0 of 4 here, with precision_check off); with the precision views
    the merge, its NF4 reload and its int8 reload all stay forgotten."""
    from icu_peft import ICUConfig
    from icu_peft.attacks import quantize_attack
    from icu_peft.testing import build_tiny_memorizer, grammar_prose
    from icu_peft.unlearner import forget

    texts = grammar_prose(26, random.Random(11))
    fg, rt, un = texts[:4], texts[4:16], texts[16:]
    build_tiny_memorizer(tmp_path / "m", fg + rt, un, steps=400, hidden=48, layers=3, seed=11)
    r = forget(ICUConfig(model=str(tmp_path / "m"), progress=False), fg, rt, un, output_dir=tmp_path / "a")
    before = r.report["precisions"]["checked"]
    # the precondition: the 4-bit base alone already differs from the full one on the forget set
    assert abs(before["nf4"]["before"]["nll"] - before["float32"]["before"]["nll"]) > 0.2
    q = quantize_attack(str(tmp_path / "m"), [str(tmp_path / "a")], fg, unseen=un)
    assert r.report["status"] == "forgotten"
    assert q["holds"], {k: v["forgotten"] for k, v in q["schemes"].items()}
