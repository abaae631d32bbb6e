"""Lifecycle library: stacking, combining, merging, revoking, inspecting and verifying forget adapters."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from icu_peft.adapters import MANIFEST_NAME, load_forget_adapters, read_manifest
from icu_peft.errors import InputError, IntegrityError
from icu_peft.lifecycle import (active_adapters, collect_leaves, combine_adapters, describe, format_description,
                                merge_adapters, merged_in_memory, remove_from_stack, revoke, stack_adapters, verify_forget_set)
from icu_peft.metrics import score_samples
from icu_peft.models import load_base_model, load_tokenizer

PROBE = ["record 12: amber basalt cobalt dune ember fjord garnet", "record 40: willow xenon yarrow zephyr acorn"]


def _ids(model_dir):
    tok = load_tokenizer(str(model_dir))
    return tok(PROBE, return_tensors="pt", padding=True)


@torch.no_grad()
def _logits(model, enc):
    return model(**enc).logits


def _base(model_dir):
    return load_base_model(str(model_dir), quantize=False)


def _manual_merge(model_dir, adapter_dirs):
    """W + sum_i s_i B_i A_i computed by hand from the adapter files: what 'A and B together' means."""
    model = _base(model_dir)
    modules = dict(model.named_modules())
    for d in adapter_dirs:
        cfg = json.loads((d / "adapter_config.json").read_text())
        s = cfg["lora_alpha"] / cfg["r"]
        w = load_file(str(d / "adapter_model.safetensors"))
        for k, a in w.items():
            if k.endswith(".lora_A.weight"):
                mod = k[len("base_model.model."):-len(".lora_A.weight")]
                b = w[k.replace("lora_A", "lora_B")]
                modules[mod].weight.data += s * (b.float() @ a.float())
    return model


@pytest.fixture(scope="module")
def ab(tiny_forget_adapter, tiny_forget_adapter_b):
    return [tiny_forget_adapter, tiny_forget_adapter_b]


@pytest.fixture(scope="module")
def merged_ab(tmp_path_factory, tiny_model_dir, ab):
    out = tmp_path_factory.mktemp("lifecycle") / "merged_ab"
    merge_adapters(tiny_model_dir, ab, out)
    return out


@pytest.fixture(scope="module")
def combined_ab(tmp_path_factory, ab):
    out = tmp_path_factory.mktemp("lifecycle") / "combined_ab"
    combine_adapters(ab, out, request_id="req-ab")
    return out


# ------------------------------------------------------------------------------------ stack

def test_stack_of_two_applies_both(tiny_model_dir, ab):
    enc = _ids(tiny_model_dir)
    stacked = stack_adapters(_base(tiny_model_dir), ab)
    assert active_adapters(stacked) == [name for name, _, _ in stacked.icu_adapters]
    assert len(active_adapters(stacked)) == 2
    l_ab = _logits(stacked, enc)
    l_a = _logits(stack_adapters(_base(tiny_model_dir), ab[:1]), enc)
    l_b = _logits(stack_adapters(_base(tiny_model_dir), ab[1:]), enc)
    l_manual = _logits(_manual_merge(tiny_model_dir, ab), enc)
    # both adapters act: the stack is neither one alone, and it is exactly W + dA + dB
    assert (l_ab - l_a).abs().max() > 1e-2 and (l_ab - l_b).abs().max() > 1e-2
    torch.testing.assert_close(l_ab, l_manual, atol=1e-4, rtol=1e-4)


def test_stack_on_4bit_base_activates_all(tiny_model_dir, ab):
    enc = _ids(tiny_model_dir)
    stacked = stack_adapters(load_base_model(str(tiny_model_dir), quantize=True), ab)
    assert len(active_adapters(stacked)) == 2
    l_ab = _logits(stacked, enc)
    with stacked.disable_adapter():
        l_0 = _logits(stacked, enc)
    stacked.base_model.set_adapter([stacked.icu_adapters[0][0]])
    l_a = _logits(stacked, enc)
    assert (l_ab - l_a).abs().max() > 1e-2 and (l_a - l_0).abs().max() > 1e-2


def test_remove_from_stack_leaves_the_rest(tiny_model_dir, ab):
    enc = _ids(tiny_model_dir)
    stacked = stack_adapters(_base(tiny_model_dir), ab)
    rid_b = read_manifest(ab[1])["request_id"]
    rest = remove_from_stack(stacked, rid_b)
    l_a = _logits(stack_adapters(_base(tiny_model_dir), ab[:1]), enc)
    torch.testing.assert_close(_logits(rest, enc), l_a, atol=1e-5, rtol=1e-5)
    assert rest.get_base_model() is not None and active_adapters(rest) == [rest.icu_adapters[0][0]]
    assert [m["request_id"] for _, m in collect_leaves(rest)] == [read_manifest(ab[0])["request_id"]]
    with pytest.raises(InputError, match="not in this stack"):
        remove_from_stack(rest, rid_b)


def test_same_request_twice_is_refused(tiny_model_dir, ab, combined_ab, merged_ab):
    with pytest.raises(IntegrityError, match="applied twice"):
        load_forget_adapters(_base(tiny_model_dir), [ab[0], ab[0]])
    with pytest.raises(IntegrityError, match="applied twice"):
        load_forget_adapters(_base(tiny_model_dir), [combined_ab, ab[1]])
    with pytest.raises(IntegrityError, match="already merged"):
        load_forget_adapters(_base(merged_ab), [ab[0]])
    with pytest.raises(IntegrityError, match="merged model, not an adapter"):
        load_forget_adapters(_base(tiny_model_dir), [merged_ab])


# ------------------------------------------------------------------------------------ integrity

def test_tampered_adapter_is_refused_even_with_force(tmp_path, tiny_model_dir, ab):
    bad = tmp_path / "tampered"
    shutil.copytree(ab[0], bad)
    f = bad / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    for force in (False, True):
        with pytest.raises(IntegrityError, match="sha256 of adapter_model.safetensors does not match"):
            load_forget_adapters(_base(tiny_model_dir), [bad], force=force)


def test_wrong_base_is_refused_unless_forced(tiny_other_model_dir, ab):
    with pytest.raises(IntegrityError, match="different base model") as e:
        load_forget_adapters(_base(tiny_other_model_dir), ab[:1])
    assert "\n" not in str(e.value)
    model = load_forget_adapters(_base(tiny_other_model_dir), ab[:1], force=True)
    assert len(active_adapters(model)) == 1


# ------------------------------------------------------------------------------------ merge

def test_merged_in_memory_is_what_merge_saves(tiny_model_dir, ab, merged_ab, tmp_path):
    enc = _ids(tiny_model_dir)
    saved = _logits(load_base_model(str(merged_ab), quantize=False), enc)
    assert torch.allclose(_logits(merged_in_memory(tiny_model_dir, ab), enc), saved, atol=1e-5)
    assert not torch.allclose(_logits(_base(tiny_model_dir), enc), saved, atol=1e-3)  # the merge did something
    with pytest.raises(IntegrityError, match="merged model"):
        merged_in_memory(tiny_model_dir, [merged_ab])


def test_merge_equals_stack_and_records_its_parts(tiny_model_dir, ab, merged_ab):
    from transformers import AutoModelForCausalLM

    enc = _ids(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(str(merged_ab))
    l_stack = _logits(stack_adapters(_base(tiny_model_dir), ab), enc)
    torch.testing.assert_close(_logits(plain, enc), l_stack, atol=1e-4, rtol=1e-4)
    m = read_manifest(merged_ab)
    assert m["kind"] == "merged"
    # no absolute path of this machine in the manifest: the base relative to the merged model
    from icu_peft.lifecycle import pristine_base

    assert not Path(m["base"]["name_or_path"]).is_absolute()
    assert pristine_base(merged_ab, m) == str(tiny_model_dir.resolve())
    assert m["base"]["weight_files"]["model.safetensors"]
    assert [a["request_id"] for a in m["adapters"]] == [read_manifest(d)["request_id"] for d in ab]
    assert not list(merged_ab.glob("*.bin"))
    assert "quantization_config" not in json.loads((merged_ab / "config.json").read_text())


def test_merged_model_loads_without_icu_peft(tmp_path, tiny_model_dir, merged_ab):
    """A fresh interpreter in which `import icu_peft` fails loads the merged model with transformers."""
    out = tmp_path / "logits.safetensors"
    code = (
        "import sys; sys.modules['icu_peft'] = None\n"
        "import torch; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "from safetensors.torch import save_file\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(merged_ab)!r}); t = AutoTokenizer.from_pretrained({str(merged_ab)!r})\n"
        f"enc = t({PROBE[0]!r}, return_tensors='pt')\n"
        "with torch.no_grad(): save_file({'l': m(**enc).logits.contiguous()}, sys.argv[1])\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load_tokenizer(str(tiny_model_dir))
    want = _logits(_base(merged_ab), tok(PROBE[0], return_tensors="pt"))
    torch.testing.assert_close(load_file(str(out))["l"], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ revoke

def test_revoke_equals_merge_of_the_rest(tmp_path, tiny_model_dir, ab, merged_ab):
    direct = tmp_path / "merged_a"
    merge_adapters(tiny_model_dir, ab[:1], direct)
    revoked = tmp_path / "revoked_b"
    revoke(merged_ab, [str(ab[1])], revoked)
    x, y = load_file(str(direct / "model.safetensors")), load_file(str(revoked / "model.safetensors"))
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x), "revoke must give the same tensors as merging the rest"
    m = read_manifest(revoked)
    assert [a["request_id"] for a in m["adapters"]] == [read_manifest(ab[0])["request_id"]]
    assert m["history"][-1]["op"] == "revoke"
    # by request id, down to nothing: the pristine base
    empty = tmp_path / "revoked_all"
    revoke(revoked, [m["adapters"][0]["request_id"]], empty)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    z = load_file(str(empty / "model.safetensors"))
    assert all(torch.equal(base[k], z[k]) for k in base)


def test_revoked_request_knowledge_comes_back(tmp_path, tiny_model_dir, tiny_corpus, ab, merged_ab):
    from icu_peft.data import tokenize_texts

    revoked = tmp_path / "revoked_b"
    revoke(merged_ab, [str(ab[1])], revoked)
    tok = load_tokenizer(str(tiny_model_dir))
    tset = tokenize_texts(tiny_corpus["forget"][2:], tok, 200, "00")
    ma_merged = sum(score_samples(_base(merged_ab), tset.input_ids, tok.pad_token_id).ma) / len(tset)
    ma_revoked = sum(score_samples(_base(revoked), tset.input_ids, tok.pad_token_id).ma) / len(tset)
    assert ma_revoked > ma_merged + 0.2, (ma_merged, ma_revoked)


def test_revoke_errors(tmp_path, ab, merged_ab, tiny_model_dir):
    with pytest.raises(InputError, match="is not in"):
        revoke(merged_ab, ["no-such-request"], tmp_path / "x")
    with pytest.raises(InputError, match="single forget adapter"):
        revoke(ab[0], ["whatever"], tmp_path / "y")
    # the pristine base moved or changed: refused (with the recorded path named), unless --base / --force
    moved = tmp_path / "moved"
    shutil.copytree(merged_ab, moved)
    m = json.loads((moved / MANIFEST_NAME).read_text())
    m["base"]["name_or_path"] = str(tmp_path / "gone")
    (moved / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="edited"):  # an edited manifest is refused as such
        revoke(moved, [str(ab[1])], tmp_path / "z")
    from icu_peft.adapters import manifest_digest

    m["manifest_sha256"] = manifest_digest(m)  # as if the base had really moved since the merge
    (moved / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(InputError, match="pristine base"):
        revoke(moved, [str(ab[1])], tmp_path / "z")
    revoke(moved, [str(ab[1])], tmp_path / "z", base=str(tiny_model_dir))
    assert (tmp_path / "z" / "model.safetensors").is_file()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------ combine

def test_combine_equals_stack(tmp_path, tiny_model_dir, ab, combined_ab):
    enc = _ids(tiny_model_dir)
    l_stack = _logits(stack_adapters(_base(tiny_model_dir), ab), enc)
    l_comb = _logits(stack_adapters(_base(tiny_model_dir), [combined_ab]), enc)
    torch.testing.assert_close(l_comb, l_stack, atol=1e-4, rtol=1e-4)
    cfg = json.loads((combined_ab / "adapter_config.json").read_text())
    assert cfg["r"] == sum(json.loads((d / "adapter_config.json").read_text())["r"] for d in ab)
    m = read_manifest(combined_ab)
    assert m["kind"] == "combined" and len(m["components"]) == 2
    assert [x.get("request_id") for _, x in collect_leaves(stack_adapters(_base(tiny_model_dir), [combined_ab]))] \
        == [read_manifest(d)["request_id"] for d in ab]


def test_combine_is_associative_and_revocable(tmp_path, ab, combined_ab):
    # flattening: combining a combined adapter again is byte-identical to combining its parts
    again = tmp_path / "again"
    combine_adapters([combined_ab], again, request_id="req-ab")
    w1 = load_file(str(again / "adapter_model.safetensors"))
    w0 = load_file(str(combined_ab / "adapter_model.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # revoking one part returns the other adapter itself
    left = tmp_path / "left"
    revoke(combined_ab, [read_manifest(ab[1])["request_id"]], left)
    assert (left / "adapter_model.safetensors").read_bytes() == (ab[0] / "adapter_model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------ inspect

def test_describe_adapter_and_merged(tmp_path, ab, merged_ab):
    d = describe(ab[0])
    m = read_manifest(ab[0])
    assert d["kind"] == "adapter" and d["integrity"] == "ok" and d["request_id"] == m["request_id"]
    assert d["size_bytes"] > (ab[0] / "adapter_model.safetensors").stat().st_size
    text = format_description(d)
    assert m["request_id"] in text and "forgotten" in text
    dm = describe(merged_ab)
    assert dm["kind"] == "merged" and [p["request_id"] for p in dm["parts"]] == [read_manifest(x)["request_id"] for x in ab]
    bad = tmp_path / "bad"
    shutil.copytree(ab[0], bad)
    (bad / "adapter_config.json").write_text("{}")
    assert describe(bad)["integrity"].startswith("FAILED")


# ------------------------------------------------------------------------------------ verify

def test_verify_matches_samples_to_manifests(tiny_model_dir, tiny_corpus, ab):
    tok = load_tokenizer(str(tiny_model_dir))
    # full precision: EL's greedy rollouts are several times faster than through bnb 4-bit on CPU
    stacked = stack_adapters(_base(tiny_model_dir), ab)
    leaves = collect_leaves(stacked)
    # one sample of each request (samples 0-1 belong to the first adapter, 2-3 to the second)
    res = verify_forget_set(stacked, tok, tiny_corpus["forget"][1:3], leaves)
    rids = [read_manifest(d)["request_id"] for d in ab]
    assert [r["request_id"] for r in res["samples"]] == rids
    manifest_ids = [read_manifest(ab[0])["samples"][1]["id"], read_manifest(ab[1])["samples"][0]["id"]]
    assert [r["id"] for r in res["samples"]] == manifest_ids
    for r in res["samples"]:
        lo, hi = r["band_nll"]  # the never-seen band's loss edges count too
        plain = r["ma"] <= r["threshold_ma"] and r["el"] <= r["threshold_el"] and lo <= r["nll"] <= hi
        # or let in as a chance outlier of the never-seen edges, as the forget run does (refine.with_chance_outliers)
        assert r["forgotten"] == (plain or bool(r.get("chance_outlier")))
        assert not (plain and r.get("chance_outlier"))
    assert res["summary"]["verdict"] == ("PASS" if all(r["forgotten"] for r in res["samples"]) else "FAIL")
    # explicit thresholds override the manifests
    res = verify_forget_set(stacked, tok, tiny_corpus["forget"][:1], leaves, ma_threshold=-1.0, el_threshold=-1.0)
    assert res["summary"]["forgotten"] == 0 and res["summary"]["verdict"] == "FAIL"
    assert res["samples"][0]["threshold_source"] == "explicit"


def test_verify_base_alone_remembers(tiny_model_dir, tiny_corpus):
    tok = load_tokenizer(str(tiny_model_dir))
    base = _base(tiny_model_dir)
    with pytest.raises(InputError, match="no thresholds"):
        verify_forget_set(base, tok, tiny_corpus["forget"], [])
    res = verify_forget_set(base, tok, tiny_corpus["forget"], [], unseen=tiny_corpus["unseen"][:4])
    assert res["summary"]["verdict"] == "FAIL" and res["summary"]["remembered"] == len(tiny_corpus["forget"])
    assert all(r["threshold_source"] == "unseen" and not math.isnan(r["ma"]) for r in res["samples"])


def test_verify_lets_in_the_same_chance_outliers_as_the_forget_run():
    from icu_peft.lifecycle.verify import _chance_outliers_per_request
    from icu_peft.refine import Thresholds
    mt = Thresholds(ma=0.7, el=0.01, source="unseen", unseen_count=16, nll_lo=2.0, nll_hi=4.0, ma_mean=0.5,
                    el_mean=0.002).to_dict()
    rows = [dict(request_id="a", manifest={"thresholds": mt}, criterion="ma_el", ma=0.4, el=e, nll=3.0,
                 forgotten=e <= 0.01) for e in (0.0, 0.02, 0.03, 0.05)]
    rows.append(dict(request_id=None, manifest=None, criterion="ma_el", ma=0.4, el=0.02, nll=3.0, forgotten=False))
    _chance_outliers_per_request(rows)
    # 4 samples of request a against 16 never-seen: P(1 above all) = 4/20, P(2) = 4*3/(20*19) = 0.03 -> one
    assert [r["forgotten"] for r in rows] == [True, True, False, False, False]
    assert rows[1].get("chance_outlier") and not rows[4].get("chance_outlier")
