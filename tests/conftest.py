"""Shared fixtures: a tiny Llama trained in-session to memorise random word sequences.

`tiny_corpus` splits the sequences into forget / retain (both memorised) and unseen (never seen);
`tiny_model_dir` is a local model directory (safetensors + tokenizer) usable as `--model`.
Built once per test session (~10 s on 2 cores).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from icu_peft.testing import build_tiny_memorizer, random_sentences

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

for _msg in ("Converting a tensor with requires_grad", "bitsandbytes::gemv_4bit", "is_gradient_checkpointing"):
    warnings.filterwarnings("ignore", message=f".*{_msg}.*")
logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session", autouse=True)
def id_key_dir(tmp_path_factory):
    """Sample-id keys go to a session directory, not the developer's ~/.config (idkeys.py)."""
    import os

    d = tmp_path_factory.mktemp("id-keys")
    old = os.environ.get("ICU_PEFT_ID_KEYS")
    os.environ["ICU_PEFT_ID_KEYS"] = str(d)
    yield d
    if old is None:
        os.environ.pop("ICU_PEFT_ID_KEYS", None)
    else:
        os.environ["ICU_PEFT_ID_KEYS"] = old


@pytest.fixture(scope="session")
def tiny_corpus():
    return {
        "forget": random_sentences(4, seed=1),
        "retain": random_sentences(12, seed=2),
        "unseen": random_sentences(12, seed=3),
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_corpus):
    d = tmp_path_factory.mktemp("tiny_model")
    build_tiny_memorizer(d, tiny_corpus["forget"] + tiny_corpus["retain"], tiny_corpus["unseen"], steps=300)
    return d


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory, tiny_corpus):
    """The tiny corpus written as .jsonl files (forget, retain, unseen)."""
    d = tmp_path_factory.mktemp("tiny_data")
    paths = {}
    for name, texts in tiny_corpus.items():
        p = d / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        paths[name] = p
    return paths


@pytest.fixture
def shared_dir():
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is missing (only present on the project's machines and CI)")
    return SHARED


def quick_config(model_dir, **kw):
    """An ICUConfig sized for the tiny model (fast, CPU)."""
    from icu_peft import ICUConfig

    # The library's defaults (method icu, learning rate auto, 400-step budget), with the whole (12-sample)
    # retain pool anchored every step and a batch that holds the forget set. With the reference code's
    # objective (method icu_paper) this tiny model loses ~55% of its retain MA.
    base = dict(model=str(model_dir), batch_size=4, progress=False, score_batch_size=16, seed=0, retain_kl_samples=12)
    base.update(kw)
    return ICUConfig(**base)


@pytest.fixture(scope="session")
def tiny_forget_adapter(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A forget adapter (4-bit base) for the first two forget samples; returns its directory."""
    from icu_peft.unlearner import forget

    out = tmp_path_factory.mktemp("adapters") / "forget_a"
    forget(quick_config(tiny_model_dir, request_id="req-a"), tiny_corpus["forget"][:2], tiny_corpus["retain"],
           tiny_corpus["unseen"], output_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_forget_adapter_b(tmp_path_factory, tiny_model_dir, tiny_corpus):
    """A second, independent forget adapter for the other two forget samples."""
    from icu_peft.unlearner import forget

    out = tmp_path_factory.mktemp("adapters") / "forget_b"
    forget(quick_config(tiny_model_dir, request_id="req-b", seed=1), tiny_corpus["forget"][2:], tiny_corpus["retain"],
           tiny_corpus["unseen"], output_dir=out)
    return out


@pytest.fixture(scope="session")
def tiny_other_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with perturbed embeddings: a different base (another fingerprint), built in ms."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("tiny_other_model") / "model"
    shutil.copytree(tiny_model_dir, d)
    state = load_file(str(d / "model.safetensors"))
    key = next(k for k in state if "embed_tokens" in k)
    state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d
