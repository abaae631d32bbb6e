"""`icu-peft forget` on bad input: one line on stderr, exit code 2, nothing written."""

import json
import logging
import subprocess
import sys

import pytest

from icu_peft.cli import main


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture
def files(tmp_path, tiny_files):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    (tmp_path / "short.txt").write_text("oak\n")
    (tmp_path / "wrongcol.csv").write_text("body\nsome text here that is long\n")
    (tmp_path / "one.txt").write_text("one never seen sentence, long enough to be scored by any tokenizer here\n")
    return tmp_path


@pytest.mark.parametrize("case,extra,message", [
    ("missing model", ["--model", "/nonexistent/model"], "model not found"),
    ("empty forget", ["--forget", "{tmp}/empty.jsonl"], "holds no samples"),
    ("malformed", ["--forget", "{tmp}/bad.jsonl"], "not valid JSON"),
    ("unknown column", ["--forget", "{tmp}/wrongcol.csv"], "no column 'text'"),
    ("too short", ["--forget", "{tmp}/short.txt"], "at least 11 are needed"),
    ("missing file", ["--forget", "{tmp}/nope.jsonl"], "file not found"),
    ("bad nll target", ["--nll-target", "high"], "nll_target must be"),
    ("nll target without unseen", ["--nll-target", "unseen"], "needs unseen text"),
    ("one never-seen sample", ["--unseen", "{tmp}/one.txt"], "has 1 sample: its band is a single point"),
])
def test_bad_input_exits_2_with_one_line(case, extra, message, files, tiny_files, tiny_model_dir, capsys):
    argv = {"--model": str(tiny_model_dir), "--forget": str(tiny_files["forget"]), "--out": str(files / "out")}
    for k, v in zip(extra[::2], extra[1::2]):
        argv[k] = v.format(tmp=files)
    flat = ["forget", "--no-progress"] + [x for kv in argv.items() for x in kv]
    code, err = _run(flat, capsys)
    assert code == 2, (case, err)
    assert message in err and len(err.splitlines()) == 1
    assert not (files / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in files.iterdir())


def test_existing_out_needs_overwrite(tmp_path, tiny_files, tiny_model_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, err = _run(["forget", "--model", str(tiny_model_dir), "--forget", str(tiny_files["forget"]),
                      "--out", str(out)], capsys)
    assert code == 2 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"


def test_cli_forget_end_to_end_and_overwrite(tmp_path, tiny_files, tiny_model_dir, capsys):
    out = tmp_path / "adapter"
    argv = ["forget", "--no-progress", "--model", str(tiny_model_dir), "--forget", str(tiny_files["forget"]),
            "--retain", str(tiny_files["retain"]), "--unseen", str(tiny_files["unseen"]), "--out", str(out),
            "--max-epochs", "2", "--seed", "3", "--lr", "2e-3"]
    # two epochs cannot reach the never-seen band: the adapter is written, marked partial, exit 3
    assert main(argv) == 3
    captured = capsys.readouterr()
    assert "forget adapter written to" in captured.out
    assert "partial:" in captured.err and "--max-steps" in captured.err
    assert (out / "adapter_model.safetensors").exists() and (out / "forget_manifest.json").exists()
    assert json.loads((out / "forget_manifest.json").read_text())["status"] == "partial"
    assert main(argv) == 2  # exists now
    capsys.readouterr()
    assert main(argv + ["--overwrite"]) == 3


def test_real_process_exit_code(tmp_path):
    p = subprocess.run([sys.executable, "-m", "icu_peft.cli", "forget", "--model", str(tmp_path / "none"),
                        "--forget", str(tmp_path / "f.txt"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("icu-peft forget: error:") and len(p.stderr.strip().splitlines()) == 1


def test_config_yaml_errors(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("icu:\n  lora_rank: 8\n")
    code, err = _run(["config", str(bad)], capsys)
    assert code == 2 and "unknown config key" in err
    bad.write_text("icu:\n  batch_size: 0\n")
    code, err = _run(["config", str(bad)], capsys)
    assert code == 2 and "batch_size" in err


def test_cli_forget_on_top_of_records_the_stack(tmp_path, tiny_model_dir, tiny_corpus, tiny_forget_adapter, caplog):
    """Sequential training from the CLI: the new manifest names the request it was trained on top of,
    and stacking the new adapter without it warns."""
    from icu_peft.adapters import read_manifest
    from icu_peft.lifecycle import stack_adapters
    from icu_peft.models import load_base_model

    forget_file = tmp_path / "b.jsonl"
    forget_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in tiny_corpus["forget"][2:]))
    out = tmp_path / "seq_b"
    argv = ["forget", "--no-progress", "--model", str(tiny_model_dir), "--forget", str(forget_file),
            "--out", str(out), "--max-epochs", "1", "--lr", "2e-3", "--request-id", "req-seq",
            "--on-top-of", str(tiny_forget_adapter)]
    assert main(argv) == 3  # one epoch: written, marked partial
    m = read_manifest(out)
    first = read_manifest(tiny_forget_adapter)
    assert m["stacked_on"] == [{"request_id": "req-a", "adapter_sha256": first["files"]["adapter_model.safetensors"]}]
    with caplog.at_level(logging.WARNING, logger="icu_peft"):
        stack_adapters(load_base_model(str(tiny_model_dir)), [out])
    assert "trained with request req-a active" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="icu_peft"):
        stack_adapters(load_base_model(str(tiny_model_dir)), [tiny_forget_adapter, out])
    assert "trained with request" not in caplog.text


@pytest.mark.parametrize("sig,code,word", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_a_signal_says_so_and_leaves_nothing(tmp_path, tiny_model_dir, tiny_files, sig, code, word):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "outdir" / "adapter"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "icu_peft.cli", "forget", "--model", str(tiny_model_dir), "--forget",
                          str(tiny_files["forget"]), "--retain", str(tiny_files["retain"]), "--unseen",
                          str(tiny_files["unseen"]), "--out", str(out), "--no-progress", "--max-steps", "100000", "--lr", "1e-9"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         # a suite started in the background by a shell without job control ignores SIGINT,
                         # and a child inherits that (Python then installs no Ctrl-C handler): start clean
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # a rate too small to ever finish: the run is in its training loop when the signal comes
    time.sleep(10)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == code, err[-2000:]
    assert word in err
    assert not out.exists()
    leftovers = list((tmp_path / "outdir").glob(".*")) if (tmp_path / "outdir").exists() else []
    assert leftovers == []


def test_a_forgotten_request_still_off_centre_says_so():
    """Every sample inside the band but the set to one side of never-seen text: a warning line, not silence
    (the exit code stays the per-sample rule's)."""
    from icu_peft.commands.forget import off_centre_warning

    report = {"status": "forgotten", "steps": 500, "step_budget": 500,
              "mia": {"after": {"loss": {"auc": 0.14}, "min_k": {"auc": 0.11}}}}
    line = off_centre_warning(report, 0.1)
    assert "past never-seen text" in line and "AUC 0.14" in line and "500-step budget" in line
    assert "--max-steps 1000" in line  # one view: more steps
    views = {"precisions": {"checked": {"nf4": {}, "float32": {}}}}
    assert "--precision-check off" in off_centre_warning({**report, **views}, 0.1)  # views that may disagree
    assert "short of" in off_centre_warning({**report, "mia": {"after": {"loss": {"auc": 0.7}}}}, 0.1)
    assert off_centre_warning({**report, "mia": {"after": {"loss": {"auc": 0.55}}}}, 0.1) is None  # centred
    assert off_centre_warning({**report, "status": "partial"}, 0.1) is None  # the partial message says enough
    assert off_centre_warning({"status": "forgotten"}, 0.1) is None  # no never-seen text: no attack measured
    assert off_centre_warning(report, 0.5) is None  # the check turned off
    # the request's own tolerance: 6 samples against 16 keep 0.1; one against 16 ends 0.25 from 0.5 by chance
    # half the time (calibrate.loss_tolerance), and there a set at 0.25 is not picked out
    counted = {**report, "forget": {"count": 6}, "band": {"count": 16}, "mia": {"after": {"loss": {"auc": 0.25}}}}
    assert "the goal 0.5 +- 0.1," in off_centre_warning(counted, 0.1)
    one = {**counted, "forget": {"count": 1}}
    assert off_centre_warning(one, 0.1) is None
    line = off_centre_warning({**one, "mia": {"after": {"loss": {"auc": 0.2}}}}, 0.1)
    assert "AUC 0.20" in line and "0.5 +- 0.25" in line


def test_a_small_never_seen_set_is_warned_about(caplog):
    """check_unseen_count: one sample refused (a point band), fewer than ADVISED_UNSEEN warned about, none or
    enough silent."""
    from icu_peft.errors import InputError
    from icu_peft.unlearner import ADVISED_UNSEEN, check_unseen_count

    with pytest.raises(InputError, match="1 sample"):
        check_unseen_count(1)
    with caplog.at_level(logging.WARNING, logger="icu_peft"):
        check_unseen_count(0)
        check_unseen_count(ADVISED_UNSEEN)
        assert caplog.text == ""
        check_unseen_count(ADVISED_UNSEEN - 1)
    assert f"rests on {ADVISED_UNSEEN - 1} samples" in caplog.text
