"""The lifecycle commands end to end: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import shutil

import pytest

from icu_peft.adapters import read_manifest
from icu_peft.cli import main


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.startswith("icu-peft")]
    assert len(lines) == 1 and needle in lines[0], err


@pytest.fixture
def tampered(tmp_path, tiny_forget_adapter):
    bad = tmp_path / "tampered"
    shutil.copytree(tiny_forget_adapter, bad)
    f = bad / "adapter_model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    return bad


def test_verify_exit_code_follows_the_samples(capsys, tiny_model_dir, tiny_files, tiny_forget_adapter,
                                              tiny_forget_adapter_b):
    # --no-quantize: EL's greedy rollouts are several times faster than through bnb 4-bit on CPU
    stack = ["--no-quantize", "--adapter", tiny_forget_adapter, "--adapter", tiny_forget_adapter_b]
    rc, out, _ = _run(capsys, "verify", "--model", tiny_model_dir, *stack, "--forget", tiny_files["forget"], "--json")
    res = json.loads(out)
    assert len(res["samples"]) == 4
    assert rc == (0 if all(r["forgotten"] for r in res["samples"]) else 1)
    # the same stack with thresholds every sample meets
    rc, out, _ = _run(capsys, "verify", "--model", tiny_model_dir, *stack, "--forget", tiny_files["forget"],
                      "--ma-threshold", "1", "--el-threshold", "1")
    assert rc == 0 and out.strip().splitlines()[-1].startswith("PASS: 4 of 4")
    # the base alone still remembers its training data
    rc, out, _ = _run(capsys, "verify", "--model", tiny_model_dir, "--no-quantize", "--forget", tiny_files["forget"],
                      "--unseen", tiny_files["unseen"])
    assert rc == 1 and out.count("REMEMBERED") == 4 and out.strip().splitlines()[-1].startswith("FAIL: 0 of 4")
    # no sample text is ever printed
    for text in open(tiny_files["forget"]).read().splitlines():
        assert json.loads(text)["text"] not in out


def test_tampered_adapter_exits_2_even_with_force(capsys, tiny_model_dir, tiny_files, tampered):
    for extra in ([], ["--force"]):
        rc, out, err = _run(capsys, "verify", "--model", tiny_model_dir, "--adapter", tampered,
                            "--forget", tiny_files["forget"], *extra)
        assert rc == 2 and out == ""
        _one_line_error(err, "does not match the manifest")


def test_wrong_base_exits_2_unless_forced(capsys, tiny_other_model_dir, tiny_forget_adapter):
    argv = ["generate", "--model", tiny_other_model_dir, "--adapter", tiny_forget_adapter, "--prompt", "record",
            "--max-new-tokens", "3"]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    _one_line_error(err, "different base model")
    rc, out, _ = _run(capsys, *argv, "--force")
    assert rc == 0 and "prompt: record" in out


def test_merge_revoke_combine_inspect(capsys, tmp_path, tiny_model_dir, tiny_forget_adapter, tiny_forget_adapter_b):
    a, b = tiny_forget_adapter, tiny_forget_adapter_b
    rid_b = read_manifest(b)["request_id"]
    merged, revoked, combined = tmp_path / "merged", tmp_path / "revoked", tmp_path / "combined"
    rc, out, _ = _run(capsys, "merge", "--model", tiny_model_dir, "--adapter", a, "--adapter", b, "--out", merged)
    assert rc == 0 and (merged / "model.safetensors").is_file()
    # an existing output is never overwritten silently
    rc, _, err = _run(capsys, "merge", "--model", tiny_model_dir, "--adapter", a, "--out", merged)
    assert rc == 2
    _one_line_error(err, "--overwrite")
    rc, out, _ = _run(capsys, "revoke", "--model", merged, "--adapter", rid_b, "--out", revoked)
    assert rc == 0 and rid_b not in out.split("still applied:")[1]
    rc, _, err = _run(capsys, "revoke", "--model", revoked, "--adapter", rid_b, "--out", tmp_path / "again")
    assert rc == 2 and not (tmp_path / "again").exists()
    _one_line_error(err, "is not in")
    rc, out, _ = _run(capsys, "combine", "--adapter", a, "--adapter", b, "--out", combined)
    assert rc == 0 and "rank 16" in out
    rc, out, _ = _run(capsys, "inspect", combined, "--json")
    d = json.loads(out)
    assert rc == 0 and d["kind"] == "combined" and d["integrity"] == "ok" and len(d["parts"]) == 2
    rc, out, _ = _run(capsys, "inspect", revoked)
    assert rc == 0 and "merged model" in out and "revoke" in out
    # a combined adapter stacks like any adapter; stacking it with one of its parts is refused
    rc, out, _ = _run(capsys, "generate", "--model", tiny_model_dir, "--adapter", combined, "--prompt", "record",
                      "--max-new-tokens", "3")
    assert rc == 0
    rc, _, err = _run(capsys, "generate", "--model", tiny_model_dir, "--adapter", combined, "--adapter", a,
                      "--prompt", "record")
    assert rc == 2
    _one_line_error(err, "applied twice")


def test_inspect_flags_tampering_and_refuses_non_adapters(capsys, tmp_path, tampered, tiny_model_dir):
    rc, out, _ = _run(capsys, "inspect", tampered)
    assert rc == 1 and "integrity: FAILED" in out
    rc, _, err = _run(capsys, "inspect", tiny_model_dir)
    assert rc == 2
    _one_line_error(err, "not an icu-peft forget adapter")
    rc, _, err = _run(capsys, "inspect", tmp_path / "missing")
    assert rc == 2
    _one_line_error(err, "not a directory")
