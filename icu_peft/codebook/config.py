"""Configs of the CodeUnlearn method: the codebook bottleneck (trained once) and a topic forget request.

Every field carries a default and one line of help, as in PEFT's tuner configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from ..errors import InputError
from .layer import SITES

KINDS = ("codes", "sae")
MASK_MODES = ("zero", "block", "negate")
POSITIONS = ("all", "answers", "both")
SELECT_RULES = ("auto", "test")


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(f"invalid codebook config: {msg}")


@dataclass
class CodebookConfig:
    """Where the bottleneck sits, what it looks like, and how it is trained."""

    # --- the bottleneck ---
    kind: str = field(default="sae", metadata={"help": "'sae' (the default: forgot more and kept everything on the planted countries, at no perplexity cost; docs/CODEUNLEARN.md): a top-k sparse autoencoder read beside the site, whose masked features are subtracted while the rest of the state passes untouched; 'codes': a codebook whose top-k codes replace the site's output (CodeUnlearn's own bottleneck)."})
    layer: Optional[int] = field(default=None, metadata={"help": "Decoder layer (0-based) whose site output is snapped to codes; negative counts from the end; unset: a tenth of the way up (3 of 30)."})
    layers: Optional[List[int]] = field(default=None, metadata={"help": "Several decoder layers, each with its own codebook / SAE of num_codes entries (ids numbered layer after layer: the second layer's start at num_codes); overrides `layer`."})
    site: str = field(default="residual", metadata={"help": "What is snapped: 'residual' (the layer's whole residual output) or 'mlp' / 'attention' (only that sub-layer's output)."})
    num_codes: Optional[int] = field(default=None, metadata={"help": "Code vectors (SAE features) per bottleneck layer; unset: 1024 codes, 2048 SAE features."})
    k: int = field(default=8, metadata={"help": "Top-k codes combined per hidden state."})
    similarity: str = field(default="cosine", metadata={"help": "How codes are ranked: 'cosine' or 'inner' (inner product)."})
    passthrough_norm_ratio: float = field(default=10.0, metadata={"help": "Positions whose hidden norm exceeds this x the median pass through unsnapped (attention sinks); 0: snap all."})
    combine: str = field(default="mean", metadata={"help": "How the k codes make the output: 'mean' or 'sum'."})

    # --- optional recovery LoRA: the layers after the bottleneck learn to read the codes ---
    recovery_lora_r: Optional[int] = field(default=None, metadata={"help": "Rank of a LoRA trained jointly with the codebook in every decoder layer after the (first) bottleneck (base frozen); 0: none; unset: 8 for 'codes', 0 for 'sae' (which replaces nothing)."})
    recovery_lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha of the recovery adapter (scale alpha / r)."})
    recovery_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the recovery LoRA weights."})

    # --- training (base frozen; only the codebook, and the recovery LoRA if any, train) ---
    steps: Optional[int] = field(default=None, metadata={"help": "Optimisation steps; unset: 300 for codes (each a forward and backward pass of the model), 1500 for an SAE (each on sae_batch_tokens stored states)."})
    batch_size: int = field(default=8, metadata={"help": "Token windows per step."})
    max_length: int = field(default=128, metadata={"help": "Training texts are cut into windows of this many tokens."})
    learning_rate: Optional[float] = field(default=None, metadata={"help": "AdamW learning rate of the code vectors / SAE weights; unset: 0.05 for codes (Adam moves each element ~lr a step; hidden states are in the hundreds), 1e-3 for an SAE (it works on unit-scale states)."})
    recon_weight: float = field(default=1.0, metadata={"help": "Weight of the reconstruction loss (relative MSE of snapped vs. original hidden state)."})
    kmeans_tokens: int = field(default=20000, metadata={"help": "Hidden states collected for the k-means initialisation."})
    kmeans_iters: int = field(default=20, metadata={"help": "k-means iterations for the initialisation."})
    sae_tokens: int = field(default=50000, metadata={"help": "SAE only: hidden states collected per layer to train it on (it needs no LM loss: the base's forward pass is not in its loop)."})
    sae_batch_tokens: int = field(default=1024, metadata={"help": "SAE only: hidden states per training step."})
    dead_code_interval: int = field(default=50, metadata={"help": "Every this many steps, codes unused since the last check are re-seeded from current hidden states (0: never)."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of the training windows held out to measure the bottleneck's perplexity cost (when no eval file)."})
    loss_chunk_size: int = field(default=64, metadata={"help": "Positions per chunk when computing the LM loss (bounds logits memory)."})
    seed: int = field(default=0, metadata={"help": "Random seed (window order, k-means, dead-code re-seeding)."})
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        _need(self.kind in KINDS, f"kind must be one of {', '.join(repr(k) for k in KINDS)}")
        if self.num_codes is None:
            self.num_codes = 1024 if self.kind == "codes" else 2048
        if self.steps is None:
            self.steps = 300 if self.kind == "codes" else 1500
        if self.recovery_lora_r is None:
            self.recovery_lora_r = 8 if self.kind == "codes" else 0
        if self.learning_rate is None:
            self.learning_rate = 0.05 if self.kind == "codes" else 1e-3
        _need(self.kind == "codes" or self.recovery_lora_r == 0,
              "an SAE replaces nothing (the rest of the state passes through): recovery_lora_r must be 0")
        if self.layers is not None:
            _need(isinstance(self.layers, (list, tuple)) and len(self.layers) >= 1
                  and all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers),
                  "layers must be a non-empty list of layer indices")
            self.layers = list(self.layers)
        _need(self.sae_tokens >= 1 and self.sae_batch_tokens >= 1, "sae_tokens and sae_batch_tokens must be >= 1")
        _need(self.site in SITES, f"site must be one of {', '.join(repr(s) for s in SITES)}")
        _need(self.num_codes >= 2, "num_codes must be >= 2")
        _need(1 <= self.k < self.num_codes, "k must be in [1, num_codes)")
        _need(self.similarity in ("cosine", "inner"), "similarity must be 'cosine' or 'inner'")
        _need(self.combine in ("mean", "sum"), "combine must be 'mean' or 'sum'")
        _need(self.steps >= 0, "steps must be >= 0")
        _need(self.batch_size >= 1, "batch_size must be >= 1")
        _need(self.max_length >= 4, "max_length must be >= 4")
        _need(self.learning_rate > 0, "learning_rate must be > 0")
        _need(self.recon_weight >= 0, "recon_weight must be >= 0")
        _need(self.kind != "codes" or self.kmeans_tokens >= self.num_codes, "kmeans_tokens must be >= num_codes")
        _need(0 <= self.eval_fraction < 1, "eval_fraction must be in [0, 1)")
        _need(self.recovery_lora_r >= 0, "recovery_lora_r must be >= 0")
        _need(self.recovery_lora_alpha > 0, "recovery_lora_alpha must be > 0")
        _need(self.recovery_learning_rate > 0, "recovery_learning_rate must be > 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "CodebookConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown codebook config key(s): {', '.join(unknown)}")
        return cls(**data)


@dataclass
class CodeForgetConfig:
    """How a topic's codes are found (no gradient step) and how the mask acts."""

    min_ratio: float = field(default=2.0, metadata={"help": "Keep codes at least this many times more frequent on topic text than on contrast text."})
    max_p: float = field(default=0.01, metadata={"help": "Keep codes whose one-sided 2x2 chi-squared p-value is below this."})
    bonferroni: bool = field(default=False, metadata={"help": "Divide max_p by the number of codes tested; too strict for a topic of a few sentences (a code on 9 of 117 positions and never on the contrast has p 0.007)."})
    min_count: int = field(default=3, metadata={"help": "Ignore codes active at fewer than this many topic positions."})
    max_codes: int = field(default=0, metadata={"help": "Keep at most this many codes, highest ratio first (0: no cap)."})
    mode: str = field(default="auto", metadata={"help": "'zero': masked codes still win but add nothing (an SAE's masked features are subtracted); 'negate': they add their opposite (an SAE feature is flipped); 'block': they are skipped and the next-best take their place (forgot less on SmolLM2; codebooks only); 'auto' (default): 'zero', and with keep texts (select 'auto') also 'negate' where 'zero' leaves name-dependent predictions, the one that leaves fewer kept (ties: 'zero'). Without keep texts 'negate' is never tried: its damage to other topics showed only there (docs/CODEUNLEARN.md)."})
    positions: str = field(default="all", metadata={"help": "Where codes are counted: 'all' topic positions against all contrast positions; 'answers': only the topic positions whose next token the topic words make likelier (against the same positions of the contrast); 'both': the union of the two selections."})
    answer_margin: float = field(default=1.0, metadata={"help": "'answers' / 'both': a topic position counts as an answer position when its next token's NLL is at least this many nats lower than at the aligned contrast position."})
    select: str = field(default="auto", metadata={"help": "'auto' (default): the codes passing the test at pool_p are tried one at a time, most significant first, and added until the topic's name-dependent predictions are gone (topic positions whose next token the model predicts after the topic's prefix and not after the contrast's); a code that costs the contrast or the keep texts a correct prediction is skipped. 'test': every code passing the test at max_p, as selected (no forward pass with the mask). 'auto' needs one contrast text per topic text."})
    pool_p: float = field(default=0.2, metadata={"help": "'auto': the p-value under which a code is a candidate (the search decides how many are used; a fixed max_p of 0.01 left 6 of 8 facts of one planted country recalled, docs/CODEUNLEARN.md)."})
    max_length: int = field(default=128, metadata={"help": "Topic/contrast texts are truncated to this many tokens."})
    batch_size: int = field(default=8, metadata={"help": "Texts per forward pass while counting code activations."})
    hash_salt: Optional[str] = field(default=None, metadata={"help": "Salt for sample ids (hex); random per request when unset."})
    request_id: Optional[str] = field(default=None, metadata={"help": "Identifier of the forget request; a UUID when unset."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over the candidates 'auto' tries (4-63 s on SmolLM2-135M, CPU)."})

    def __post_init__(self) -> None:
        _need(self.min_ratio >= 1.0, "min_ratio must be >= 1")
        _need(0 < self.max_p <= 1, "max_p must be in (0, 1]")
        _need(self.min_count >= 1, "min_count must be >= 1")
        _need(self.max_codes >= 0, "max_codes must be >= 0")
        modes = MASK_MODES + ("auto",)
        _need(self.mode in modes, f"mode must be one of {', '.join(repr(m) for m in modes)}")
        _need(self.positions in POSITIONS, f"positions must be one of {', '.join(repr(m) for m in POSITIONS)}")
        _need(self.answer_margin >= 0, "answer_margin must be >= 0")
        _need(self.select in SELECT_RULES, f"select must be one of {', '.join(repr(m) for m in SELECT_RULES)}")
        _need(0 < self.pool_p <= 1, "pool_p must be in (0, 1]")
        _need(self.max_length >= 2, "max_length must be >= 2")
        _need(self.batch_size >= 1, "batch_size must be >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("hash_salt", None)
        return d
