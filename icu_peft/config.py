"""ICUConfig: every knob of an ICU forget request, each with a default and one line of help.

Defaults follow the ICU reference code (himalalps/ICU) where it has one; see docs/METHOD.md for
where we depart from it and why.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import InputError

# Jang et al. (2022) measured these for GPT-Neo-125M on unseen Pile text; ICU's code uses them as
# its stopping thresholds. They are only a fallback: thresholds belong to the model being unlearned.
DEFAULT_MA_THRESHOLD = 0.5994
DEFAULT_EL_THRESHOLD = 0.0499


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and x > 0


@dataclass
class ICUConfig:
    """Configuration of one ICU forget request (KUI + CLE + IUR trained into a LoRA adapter)."""

    # --- base model ---
    model: Optional[str] = field(default=None, metadata={"help": "Base model: local directory or hub id."})
    gguf_file: Optional[str] = field(default=None, metadata={"help": "GGUF file name inside `model` (transformers dequantizes it)."})
    quantize: bool = field(default=True, metadata={"help": "Load the frozen base in 4-bit NF4 (bitsandbytes); False keeps full precision."})
    compute_dtype: str = field(default="auto", metadata={"help": "Compute dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16 or float16."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% slower; worth it for 7B+."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the model repository (off unless you trust it)."})

    # --- LoRA ---
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_layers: int = field(default=0, metadata={"help": "LoRA only in the last N decoder layers (0: all); backward stops there: faster, less memory."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: Any = field(default="all-linear", metadata={"help": "Modules that get LoRA: 'all-linear' or a list of module names."})

    # --- data ---
    max_length: int = field(default=200, metadata={"help": "Samples longer than this many tokens are truncated (ICU: 200)."})
    text_field: str = field(default="text", metadata={"help": "Field (jsonl) or column (csv) holding the text."})
    hash_salt: Optional[str] = field(default=None, metadata={"help": "Salt for sample ids (hex); random per request when unset."})

    # --- loss (ICU: loss = -u*L_fgt + a*L_lrn + b*L_kl) ---
    method: str = field(default="icu", metadata={"help": "Label of the method: icu, ga (Jang's KUMPR), graddiff, npo; see ICUConfig.for_method."})
    forget_loss: str = field(default="ga", metadata={"help": "Forget term: 'ga' (negated NLL, ICU/KUI) or 'npo' (negative preference optimisation)."})
    npo_beta: float = field(default=0.1, metadata={"help": "NPO inverse temperature beta."})
    forget_tokens: str = field(default="predicted", metadata={"help": "Tokens the forget term pushes on: 'predicted' (only those the model still gets right) or 'all' (ICU's code)."})
    forget_distinct_ngram: int = field(default=0, metadata={"help": "Forget term skips tokens whose n-gram (token + n-1 before) occurs in the retain pool: shared template, not private text (0: off; 4 suits records)."})
    nll_target: Any = field(default="off", metadata={"help": "After training, scale the adapter so the forget set's mean NLL is near this: 'unseen' (the base's mean NLL on the unseen text), a number of nats, or 'off' (ICU)."})
    nll_tolerance: float = field(default=0.5, metadata={"help": "nll_target: a mean NLL this close (nats) needs no scaling."})
    nll_max_scale: float = field(default=2.0, metadata={"help": "nll_target: largest factor the adapter may be scaled up by when forgetting stopped short of the target."})
    nll_probes: int = field(default=6, metadata={"help": "nll_target: bisection steps over the scale (each scores the forget set once)."})
    retain_kl_samples: int = field(default=8, metadata={"help": "Extra random retain samples per step for the NLL/KL terms, beside the neighbours (ICU's code: 0)."})
    forget_weight: float = field(default=1.0, metadata={"help": "u: weight of the gradient-ascent term on the forget samples (KUI)."})
    learn_weight: float = field(default=0.5, metadata={"help": "a: weight of the NLL on each forget sample's neighbours (CLE)."})
    kl_weight: float = field(default=1.0, metadata={"help": "b: weight of KL(p_ref || p_model) on the neighbours (CLE); p_ref = adapter disabled."})
    num_neighbours: int = field(default=1, metadata={"help": "Neighbours drawn from the retain pool per forget sample (ICU: 1)."})
    embedder: str = field(default="base", metadata={"help": "Neighbour embeddings: 'base' (the base model's mean-pooled hidden states) or 'sentence-transformers[:PATH]'."})
    embed_tail_tokens: int = field(default=0, metadata={"help": "Embed only the last N tokens of each text (ICU embeds the tail); 0 = whole text."})
    no_retain: str = field(default="generate", metadata={"help": "Without a retain pool: 'generate' (neighbours sampled from the base model itself) or 'refuse'."})
    generated_retain_size: int = field(default=16, metadata={"help": "How many texts to sample from the base when no retain pool is given."})
    loss_chunk_size: int = field(default=64, metadata={"help": "Positions per chunk when computing NLL/KL from hidden states (bounds logits memory)."})

    # --- optimisation ---
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or fine-tune every weight (False; needs quantize=False; a baseline)."})
    iur: bool = field(default=True, metadata={"help": "Per-sample refinement: forgotten samples leave the batch. False: train on all until the means pass (Jang et al.)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Adam learning rate for the LoRA weights."})
    adam_betas: Any = field(default=(0.9, 0.98), metadata={"help": "Adam betas (ICU: 0.9, 0.98)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=8, metadata={"help": "Forget samples per optimisation step (ICU: 8)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    max_epochs: int = field(default=30, metadata={"help": "Epoch cap (ICU's code has none)."})
    min_epochs: int = field(default=0, metadata={"help": "Train at least this many epochs even when every sample already passes."})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, LoRA init, generated retain pool)."})

    # --- IUR: who counts as forgotten ---
    criterion: str = field(default="ma_el", metadata={"help": "'ma_el': MA and EL_n at or below thresholds; 'bleu': ICU's generated-suffix BLEU criterion."})
    el_n: int = field(default=10, metadata={"help": "n of the extraction likelihood EL_n."})
    lazy_el: bool = field(default=True, metadata={"help": "During IUR compute EL_n only for samples whose MA passes (one failing MA is not forgotten anyway); final scores are complete."})
    neighbour_micro_batch: int = field(default=4, metadata={"help": "Neighbour sequences per forward/backward pass (0: all at once, as ICU's code); same gradient, less activation memory."})
    reference_cache_mb: int = field(default=512, metadata={"help": "Memory (MB, CPU) for keeping the frozen reference's hidden states of samples already seen (0: recompute every step)."})
    prefix_cache_mb: int = field(default=512, metadata={"help": "Memory (MB, CPU) for the hidden states below the lowest trained layer, so steps run only the layers with LoRA (0: run every layer every step)."})
    retain_el: bool = field(default=False, metadata={"help": "Also score EL_n of the retain samples in the report (slow once retain text drifts: a roll-out per departure)."})
    el_start: int = field(default=1, metadata={"help": "Shortest prefix scored by EL_n (Jang: 1; ICU's code: 150 of 200)."})
    ma_threshold: Optional[float] = field(default=None, metadata={"help": "MA threshold; measured from --unseen when given, else 0.5994 with a warning."})
    el_threshold: Optional[float] = field(default=None, metadata={"help": "EL_n threshold; measured from --unseen when given, else 0.0499 with a warning."})
    bleu_prefix_tokens: int = field(default=50, metadata={"help": "BLEU criterion: prefix length fed to the model (ICU: 50)."})
    bleu_suffix_tokens: int = field(default=50, metadata={"help": "BLEU criterion: tokens generated and compared (ICU: 50)."})
    bleu_threshold: float = field(default=0.01, metadata={"help": "BLEU criterion: forgotten when BLEU-4 is below this (ICU: 0.01)."})
    score_batch_size: int = field(default=16, metadata={"help": "Sequences per batch when scoring (MA, EL, BLEU)."})

    # --- bookkeeping ---
    request_id: Optional[str] = field(default=None, metadata={"help": "Identifier of the forget request; a UUID when unset."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        if isinstance(self.adam_betas, list):
            self.adam_betas = tuple(self.adam_betas)
        if isinstance(self.nll_target, str) and self.nll_target not in ("off", "unseen"):
            try:  # from the command line every value is a string
                self.nll_target = float(self.nll_target)
            except ValueError:
                pass  # validate() names the field
        self.validate()

    def validate(self) -> None:
        """Raise InputError with a one-line message for any out-of-range value."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InputError(f"invalid config: {msg}")

        need(self.lora_r > 0, "lora_r must be > 0")
        need(self.max_length > self.el_n + 1, "max_length must exceed el_n + 1")
        need(self.el_n >= 1, "el_n must be >= 1")
        need(self.el_start >= 1, "el_start must be >= 1")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(self.num_neighbours >= 0, "num_neighbours must be >= 0")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(self.max_epochs >= 0, "max_epochs must be >= 0")
        need(self.loss_chunk_size >= 1, "loss_chunk_size must be >= 1")
        need(self.criterion in ("ma_el", "bleu"), "criterion must be 'ma_el' or 'bleu'")
        need(self.forget_loss in ("ga", "npo"), "forget_loss must be 'ga' or 'npo'")
        need(self.forget_tokens in ("all", "predicted"), "forget_tokens must be 'all' or 'predicted'")
        need(self.use_lora or not self.quantize, "full fine-tuning (use_lora=False) needs quantize=False")
        need(self.nll_target in ("off", "unseen") or _is_number(self.nll_target),
             "nll_target must be 'off', 'unseen' or a positive number")
        need(self.nll_tolerance >= 0 and self.nll_max_scale >= 1 and self.nll_probes >= 0,
             "nll_tolerance and nll_probes must be >= 0, nll_max_scale >= 1")
        need(self.retain_kl_samples >= 0, "retain_kl_samples must be >= 0")
        need(self.neighbour_micro_batch >= 0, "neighbour_micro_batch must be >= 0")
        need(self.reference_cache_mb >= 0 and self.prefix_cache_mb >= 0, "reference_cache_mb and prefix_cache_mb must be >= 0")
        need(self.no_retain in ("generate", "refuse"), "no_retain must be 'generate' or 'refuse'")
        need(self.compute_dtype in ("auto", "float32", "bfloat16", "float16"), "compute_dtype must be auto, float32, bfloat16 or float16")
        need(len(tuple(self.adam_betas)) == 2, "adam_betas must have two values")
        need(self.embedder == "base" or self.embedder.startswith("sentence-transformers"),
             "embedder must be 'base' or 'sentence-transformers[:PATH]'")

    @staticmethod
    def method_preset(method: str) -> dict:
        """Field values of ICU and of the baselines it is compared with.

        icu:       -u*NLL(forget) + a*NLL(neighbour) + b*KL(ref||model), per-sample refinement, with
                   icu-peft's selective defaults (forget_tokens='predicted', retain_kl_samples=8)
        icu_paper: the objective of ICU's reference code (every token ascends; neighbours only; one
                   forward/backward pass per step)
        ga:        Jang et al.'s KUMPR, gradient ascent alone until the means pass
        graddiff:  gradient ascent + NLL on retain text
        npo:       negative preference optimisation on the forget set + NLL on retain text
        """
        presets = {
            "icu": dict(),
            "icu_paper": dict(forget_tokens="all", retain_kl_samples=0, neighbour_micro_batch=0),
            "ga": dict(learn_weight=0.0, kl_weight=0.0, num_neighbours=0, iur=False, forget_tokens="all",
                       retain_kl_samples=0),
            "graddiff": dict(learn_weight=1.0, kl_weight=0.0, iur=False, forget_tokens="all", retain_kl_samples=0),
            "npo": dict(forget_loss="npo", learn_weight=1.0, kl_weight=0.0, iur=False, retain_kl_samples=0),
        }
        if method not in presets:
            raise InputError(f"unknown method '{method}': choose from {', '.join(presets)}")
        return {"method": method, **presets[method]}

    @classmethod
    def for_method(cls, method: str, **kw: Any) -> "ICUConfig":
        """A config for `method` (see method_preset); any field in kw wins."""
        return cls(**{**cls.method_preset(method), **kw})

    # --- (de)serialisation ---
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: dict) -> "ICUConfig":
        unknown = sorted(set(data) - cls.field_names())
        if unknown:
            raise InputError(f"unknown config key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "ICUConfig":
        """Load a recipe. Keys under `icu:` (or at top level) are config fields; `data:` is ignored here.

        Precedence: the preset of the recipe's `method` < the recipe's fields < non-None overrides.
        """
        body = read_recipe(path)[0]
        body.update({k: v for k, v in overrides.items() if v is not None})
        preset = cls.method_preset(body["method"]) if "method" in body else {}
        return cls.from_dict({**preset, **body})


def read_recipe(path: str | Path):
    """(config fields, data section) of a recipe YAML, with one-line errors."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise InputError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InputError(f"config file {path} must hold a mapping")
    body = raw.get("icu", {k: v for k, v in raw.items() if k not in ("data", "description", "notes")})
    data = raw.get("data") or {}
    if not isinstance(body, dict) or not isinstance(data, dict):
        raise InputError(f"config file {path}: `icu:` and `data:` must be mappings")
    return dict(body), data


def help_table() -> str:
    """Every config field with its default and help, for `icu-peft config`."""
    rows = []
    for f in dataclasses.fields(ICUConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append(f"{f.name:24s} {default!r:14s} {f.metadata.get('help', '')}")
    return "\n".join(rows)
