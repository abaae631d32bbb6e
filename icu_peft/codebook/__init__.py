"""CodeUnlearn: zero-shot topic forgetting through a bottleneck on one or more decoder layers: a top-k
SAE read beside the residual stream (the default, sae.py) or a codebook in its place (layer.py).

Train it once per base (`train_codebook`), then answer each forget request without a
gradient step (`forget_topic` -> a code mask). Codebooks and masks follow the forget-adapter
contract (safetensors + forget_manifest.json with sha256s and the base fingerprint); masks stack as
sets (`stack_masks`, `revoke_mask`), and `load_codebook_model` gives back a causal LM for any metric.
"""

from .api import (CodeMask, Codebook, describe, load_codebook_model, read_code_mask, read_codebook, revoke_mask,
                  stack_masks, verify_dir)
from .config import CodebookConfig, CodeForgetConfig

__all__ = ["CodebookConfig", "CodeForgetConfig", "Codebook", "CodeMask", "load_codebook_model", "read_codebook",
           "read_code_mask", "stack_masks", "revoke_mask", "verify_dir", "describe", "train_codebook", "forget_topic"]


def train_codebook(*args, **kwargs):
    """Train a codebook bottleneck; see :func:`icu_peft.codebook.train.train_codebook`."""
    from .train import train_codebook as _train

    return _train(*args, **kwargs)


def forget_topic(*args, **kwargs):
    """Answer a topic forget request with a code mask; see :func:`icu_peft.codebook.forget.forget_topic`."""
    from .forget import forget_topic as _forget

    return _forget(*args, **kwargs)
