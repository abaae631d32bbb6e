"""Artifacts you can trust once they leave your hands: each case fails on an artifact check that is missing.

Manifest digest, paths that escape, incomplete adapters, tampered merged models, signatures, keyed
sample ids, outputs that cannot be written or would replace an input.
"""

from __future__ import annotations

import json
import shutil

import pytest

from icu_peft.adapters import MANIFEST_NAME, manifest_digest, read_manifest, verify_files
from icu_peft.cli import main
from icu_peft.errors import IntegrityError


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _rewrite(directory, edit, redigest=True):
    """Edit a manifest in place; with redigest, as a forger who also recomputes its digest would."""
    m = json.loads((directory / MANIFEST_NAME).read_text())
    edit(m)
    if redigest:
        m["manifest_sha256"] = manifest_digest(m)
    (directory / MANIFEST_NAME).write_text(json.dumps(m))
    return m


@pytest.fixture
def copy_of(tmp_path):
    def make(src, name="copy"):
        d = tmp_path / name
        shutil.copytree(src, d)
        return d
    return make


# ------------------------------------------------------------------------------------ manifest digest

def test_an_edited_manifest_fails_verify_and_inspect(capsys, copy_of, tiny_model_dir, tiny_files, tiny_forget_adapter):
    bad = copy_of(tiny_forget_adapter)

    def loosen(m):
        m["thresholds"]["ma"] = 1.0
        m["thresholds"]["el"] = 1.0
        m["status"] = "forgotten"
    _rewrite(bad, loosen, redigest=False)
    rc, _, err = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", bad, "--forget", tiny_files["forget"])
    assert rc == 2 and "edited" in err
    rc, out, _ = _run(capsys, "inspect", bad)
    assert rc == 1 and "integrity: FAILED" in out and "edited" in out
    # the untouched adapter still checks out
    verify_files(tiny_forget_adapter)


# ------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("rel", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.json"])
def test_manifest_paths_outside_the_adapter_are_refused_before_reading(copy_of, tiny_forget_adapter, tmp_path, rel):
    bad = copy_of(tiny_forget_adapter)
    (tmp_path / "outside.json").write_text("{}")
    _rewrite(bad, lambda m: m["files"].__setitem__(rel, "0" * 64))
    with pytest.raises(IntegrityError, match="outside the adapter"):
        verify_files(bad)


def test_a_symlink_out_of_the_adapter_is_refused(copy_of, tiny_forget_adapter, tmp_path):
    bad = copy_of(tiny_forget_adapter)
    (tmp_path / "secret.txt").write_text("x")
    (bad / "link.txt").symlink_to(tmp_path / "secret.txt")
    from icu_peft.adapters import sha256_file

    _rewrite(bad, lambda m: m["files"].__setitem__("link.txt", sha256_file(tmp_path / "secret.txt")))
    with pytest.raises(IntegrityError, match="outside the adapter"):
        verify_files(bad)


def test_revoke_refuses_a_part_that_points_outside_and_writes_nothing(capsys, tmp_path, tiny_forget_adapter,
                                                                      tiny_forget_adapter_b):
    from icu_peft.lifecycle import combine_adapters

    combined = tmp_path / "combined"
    combine_adapters([tiny_forget_adapter, tiny_forget_adapter_b], combined)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("not yours")
    _rewrite(combined, lambda m: m["components"][1].__setitem__("relpath", "../victim"))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "revoke", "--model", combined, "--adapter", "req-a", "--out", out)
    assert rc == 2 and "outside the adapter" in err
    assert not out.exists()


def test_an_adapter_without_its_weights_is_refused_without_the_network(capsys, copy_of, tiny_model_dir, tiny_files,
                                                                       tiny_forget_adapter, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    bad = copy_of(tiny_forget_adapter)
    (bad / "adapter_model.safetensors").unlink()
    _rewrite(bad, lambda m: m["files"].pop("adapter_model.safetensors"))
    t = time.perf_counter()
    rc, _, err = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", bad, "--forget", tiny_files["forget"])
    assert rc == 2 and "adapter_model.safetensors" in err
    assert time.perf_counter() - t < 30  # refused, not retried against a hub
    rc, out, _ = _run(capsys, "inspect", bad)
    assert rc == 1 and "FAILED" in out


# ------------------------------------------------------------------------------------ merged models

def test_a_tampered_merged_model_is_refused_by_every_loader(capsys, tmp_path, tiny_model_dir, tiny_files,
                                                            tiny_forget_adapter):
    from icu_peft.lifecycle import merge_adapters

    merged = tmp_path / "merged"
    merge_adapters(str(tiny_model_dir), [tiny_forget_adapter], merged)
    w = merged / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x01
    w.write_bytes(bytes(raw))
    for argv in (["verify", "--model", merged, "--forget", tiny_files["forget"]],
                 ["eval", "--model", merged, "--data", tiny_files["forget"], "--metrics", "ma"],
                 ["generate", "--model", merged, "--prompt", "record"]):
        rc, _, err = _run(capsys, *argv)
        assert rc == 2 and "does not match" in err, (argv, err)
    # an adapter passed as --model is not a model
    rc, _, err = _run(capsys, "eval", "--model", tiny_forget_adapter, "--data", tiny_files["forget"], "--metrics", "ma")
    assert rc == 2 and "pass it as --adapter" in err


# ------------------------------------------------------------------------------------ signatures

def test_sign_and_verify_with_a_public_key(capsys, tmp_path, copy_of, tiny_model_dir, tiny_files,
                                           tiny_forget_adapter):
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    rc, _, _ = _run(capsys, "keygen", "--private-key", priv, "--public-key", pub)
    assert rc == 0 and (priv.stat().st_mode & 0o777) == 0o600
    rc, _, err = _run(capsys, "keygen", "--private-key", priv, "--public-key", tmp_path / "other.pub")
    assert rc == 2 and "overwrite" in err
    signed = copy_of(tiny_forget_adapter, "signed")
    rc, out, _ = _run(capsys, "sign", signed, "--key", priv)
    assert rc == 0 and (signed / "forget_manifest.sig").is_file()
    verify_files(signed)  # the signature file does not disturb the file check
    rc, out, _ = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", signed, "--forget",
                      tiny_files["forget"], "--public-key", pub)
    assert rc in (0, 1) and "signature ok" in out  # 0/1: the samples' verdict; the signature passed
    # another operator's key
    _run(capsys, "keygen", "--private-key", tmp_path / "o.pem", "--public-key", tmp_path / "o.pub")
    rc, _, err = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", signed, "--forget",
                      tiny_files["forget"], "--public-key", tmp_path / "o.pub")
    assert rc == 2 and "signature does not match" in err
    # edited after signing by someone who recomputed the digest: the signature no longer holds
    _rewrite(signed, lambda m: m["thresholds"].__setitem__("ma", 1.0))
    rc, _, err = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", signed, "--forget",
                      tiny_files["forget"], "--public-key", pub)
    assert rc == 2 and "signature does not match" in err
    # an unsigned adapter is not accepted when a signature is required
    rc, _, err = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", tiny_forget_adapter, "--forget",
                      tiny_files["forget"], "--public-key", pub)
    assert rc == 2 and "not signed" in err
    # a corrupt key file is one line, not a traceback
    (tmp_path / "junk.pem").write_text("nope")
    rc, _, err = _run(capsys, "sign", signed, "--key", tmp_path / "junk.pem")
    assert rc == 2 and "PEM" in err


# ------------------------------------------------------------------------------------ keyed sample ids

def test_a_candidate_text_cannot_be_confirmed_without_the_operators_key(tmp_path, monkeypatch, tiny_model_dir,
                                                                        tiny_corpus, tiny_forget_adapter, id_key_dir):
    from icu_peft.adapters import load_forget_adapters
    from icu_peft.data import sample_id
    from icu_peft.idkeys import read_key_file
    from icu_peft.lifecycle import collect_leaves, verify_forget_set
    from icu_peft.models import load_base_model, load_tokenizer

    m = read_manifest(tiny_forget_adapter)
    ids = {s["id"] for s in m["samples"]}
    blob = json.dumps(m)
    # nothing in the shipped manifest turns a candidate text into one of its ids
    for value in [v for v in _strings(m) if len(v) >= 16]:
        try:
            bytes.fromhex(value)
        except ValueError:
            continue
        assert not any(sample_id(t, value) in ids for t in tiny_corpus["forget"]), "a manifest value keys the ids"
    assert "salt" not in blob

    model = load_forget_adapters(load_base_model(str(tiny_model_dir)), [str(tiny_forget_adapter)])
    tok = load_tokenizer(str(tiny_model_dir))
    texts = tiny_corpus["forget"][:2]
    key_file = id_key_dir / f"{m['id_key']}.hex"
    # a third party: no key on this machine. Every text is still checked, none is matched to the request
    monkeypatch.setenv("ICU_PEFT_ID_KEYS", str(tmp_path / "empty"))
    blind = verify_forget_set(model, tok, texts, collect_leaves(model))
    assert blind["summary"]["matched_to_manifest"] == 0 and blind["summary"]["samples"] == 2
    # the auditor the operator handed the key file to
    told = verify_forget_set(model, tok, texts, collect_leaves(model), id_keys=[read_key_file(key_file)])
    assert told["summary"]["matched_to_manifest"] == 2
    assert {r["id"] for r in told["samples"]} == ids


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


# ------------------------------------------------------------------------------------ outputs

def test_an_unwritable_out_is_refused_before_training(capsys, tmp_path, tiny_model_dir, tiny_files):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "adapter", "/proc/icu-peft-cannot-write-here"):
        rc, _, err = _run(capsys, "forget", "--model", tiny_model_dir, "--forget", tiny_files["forget"],
                          "--out", out, "--no-progress")
        assert rc == 2 and "cannot" in err and "output" in err, err


def test_out_equal_to_or_inside_the_model_is_refused(capsys, tmp_path, copy_of, tiny_model_dir, tiny_files,
                                                     tiny_forget_adapter):
    model = copy_of(tiny_model_dir, "model")
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "sub"):
        rc, _, err = _run(capsys, "forget", "--model", model, "--forget", tiny_files["forget"], "--out", out,
                          "--overwrite", "--no-progress")
        assert rc == 2 and "overlaps an input" in err
        rc, _, err = _run(capsys, "merge", "--model", model, "--adapter", tiny_forget_adapter, "--out", out,
                          "--overwrite")
        assert rc == 2 and "overlaps an input" in err
    assert sorted(p.name for p in model.iterdir()) == before


def test_absurd_learning_rates_are_one_line_errors(capsys, tiny_model_dir, tiny_files, tmp_path):
    for lr in ("1e38", "-1", "nan", "inf", "fast"):
        rc, _, err = _run(capsys, "forget", "--model", tiny_model_dir, "--forget", tiny_files["forget"],
                          "--out", tmp_path / "o", "--lr", lr, "--no-progress")
        assert rc == 2 and "learning_rate" in err and "Traceback" not in err, (lr, err)
        assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------ base fingerprint

def test_a_base_with_any_weight_changed_is_another_base(capsys, tmp_path, copy_of, tiny_model_dir, tiny_files,
                                                        tiny_forget_adapter):
    import torch
    from safetensors.torch import load_file, save_file

    from icu_peft.models import base_fingerprint, load_base_model

    other = copy_of(tiny_model_dir, "other_base")
    state = load_file(str(other / "model.safetensors"))
    key = next(k for k in state if "layers.1.mlp.down_proj" in k)  # far from the embeddings
    state[key] = state[key] + 1e-3 * torch.ones_like(state[key])
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    a, b = base_fingerprint(load_base_model(str(tiny_model_dir))), base_fingerprint(load_base_model(str(other)))
    assert a["sha256"] == b["sha256"]  # the embeddings alone cannot tell them apart
    assert a["weights_sha256"] != b["weights_sha256"]
    # the same checkpoint in full precision has the same fingerprint as in 4 bits
    assert base_fingerprint(load_base_model(str(tiny_model_dir), quantize=False)) == a
    rc, _, err = _run(capsys, "verify", "--model", other, "--adapter", tiny_forget_adapter, "--forget",
                      tiny_files["forget"])
    assert rc == 2 and "different base" in err and "weights differ" in err
    rc, _, _ = _run(capsys, "verify", "--model", other, "--adapter", tiny_forget_adapter, "--forget",
                    tiny_files["forget"], "--force")
    assert rc in (0, 1)


def test_the_file_hash_cache_notices_a_rewrite(tmp_path, monkeypatch):
    import os

    from icu_peft.adapters import sha256_file
    from icu_peft.models import cached_file_sha256

    monkeypatch.setenv("ICU_PEFT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    first = cached_file_sha256(f)
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size; mtime put back as a forger would
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cached_file_sha256(f) == sha256_file(f) != first


# ------------------------------------------------------------------------------------ inputs

def test_strict_csv_keeps_multiline_fields_and_names_the_broken_line(tmp_path):
    from icu_peft.data import read_texts
    from icu_peft.errors import InputError

    good = tmp_path / "good.csv"
    good.write_text('id,text\n1,"first line\nsecond line"\n2,plain\n', newline="")
    assert read_texts(good) == ["first line\nsecond line", "plain"]
    unclosed = tmp_path / "unclosed.csv"
    unclosed.write_text('text\nfine\n"never closed\nrow 4\nrow 5\n')
    with pytest.raises(InputError, match=r"unclosed\.csv:3: malformed CSV"):
        read_texts(unclosed)
    stray = tmp_path / "stray.csv"
    stray.write_text('text\nok\n"quoted"junk\n')
    with pytest.raises(InputError, match=r"stray\.csv:3: malformed CSV"):
        read_texts(stray)
    extra = tmp_path / "extra.csv"
    extra.write_text("text\nok\na,b\n")
    with pytest.raises(InputError, match=r"extra\.csv:3: more fields"):
        read_texts(extra)


def test_nul_bytes_are_refused_with_their_line(tmp_path):
    from icu_peft.data import read_texts
    from icu_peft.errors import InputError

    f = tmp_path / "nul.txt"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(InputError, match="NUL bytes"):
        read_texts(f)
    g = tmp_path / "mixed.jsonl"
    g.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": "bad\u0000bytes"}) + "\n")
    with pytest.raises(InputError, match=r"mixed\.jsonl:2: .*NUL"):
        read_texts(g)


def test_parquet_saved_datasets_and_dataset_objects(tmp_path):
    import datasets

    from icu_peft.data import as_texts, read_texts
    from icu_peft.errors import InputError

    ds = datasets.Dataset.from_dict({"text": ["alpha beta", "gamma delta"], "n": [1, 2]})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    assert read_texts(tmp_path / "d.parquet") == ["alpha beta", "gamma delta"]
    assert read_texts(tmp_path / "saved") == ["alpha beta", "gamma delta"]
    assert as_texts(ds) == ["alpha beta", "gamma delta"]
    with pytest.raises(InputError, match="no column 'body'"):
        read_texts(tmp_path / "d.parquet", "body")
    with pytest.raises(InputError, match="not text"):
        as_texts(ds, "n")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="not a readable parquet"):
        read_texts(tmp_path / "junk.parquet")


def test_a_huge_single_line_sample_is_cut_before_tokenizing(tiny_model_dir):
    from icu_peft.data import MAX_CHARS_PER_TOKEN, new_salt, tokenize_texts
    from icu_peft.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    seen = []
    real_call = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **kw):
            seen.append(len(text))
            return real_call(self, text, *a, **kw)

    tok.__class__ = Spy
    text = "amber basalt cobalt " * 500_000  # 10 MB on one line
    ts = tokenize_texts([text], tok, 64, new_salt())
    assert len(ts.input_ids[0]) == 64 and ts.truncated == 1
    assert max(seen) <= 64 * MAX_CHARS_PER_TOKEN
    # the cut keeps exactly the tokens a full tokenization keeps
    short = "amber basalt cobalt " * 200
    assert ts.input_ids[0].tolist() == real_call(tok, short)["input_ids"][:64]


def test_generated_retain_text_never_repeats_the_forget_set(tiny_model_dir, tiny_corpus):
    import torch

    from icu_peft import ICUConfig
    from icu_peft.data import new_salt, tokenize_texts
    from icu_peft.models import load_base_model, load_tokenizer
    from icu_peft.unlearner import drop_overlapping, generate_retain_pool

    # the pure rule: a verbatim forget sample inside a generated text goes; a shared short template stays
    f = [torch.tensor([0] + list(range(10, 30)))]
    assert drop_overlapping([torch.tensor([0, 5] + list(range(10, 30)) + [7])], f) == []
    keep = torch.tensor([0] + list(range(10, 15)) + [99] * 10)
    assert len(drop_overlapping([keep], f)) == 1
    # the tiny model memorised its forget samples: sampling from it brings some back, and the pool drops them
    model, tok = load_base_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    salt = new_salt()
    forget = tokenize_texts(tiny_corpus["forget"], tok, 64, salt)
    cfg = ICUConfig(model=str(tiny_model_dir), generated_retain_size=32, seed=0)
    raw = generate_retain_pool(model, tok, cfg, salt)
    assert len(drop_overlapping(raw.input_ids, forget.input_ids)) < len(raw), "precondition: some text came back"
    pool = generate_retain_pool(model, tok, cfg, salt, forget)
    assert len(pool) > 0 and drop_overlapping(pool.input_ids, forget.input_ids) == pool.input_ids
