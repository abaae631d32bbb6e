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
