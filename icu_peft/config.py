"""ICUConfig: every knob of an ICU forget request, each with a default and one line of help.

Defaults follow the ICU reference code (himalalps/ICU) where it has one; see docs/METHOD.md for
where we depart from it and why.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import yaml

from .errors import InputError

# Jang et al. (2022) measured these for GPT-Neo-125M on unseen Pile text; ICU's code uses them as
# its stopping thresholds. They are only a fallback: thresholds belong to the model being unlearned.
DEFAULT_MA_THRESHOLD = 0.5994
DEFAULT_EL_THRESHOLD = 0.0499


FORGET_LOSSES = ("target", "ga", "npo", "simnpo", "undial")
PRECISION_CHECKS = ("auto", "on", "off")
TAIL_ATTACKS = ("min_k", "min_k_plus_plus")  # the hardest-fifth attacks the loop can steer (tail_attacks)


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
    cpu_heap_steps: Any = field(default="auto", metadata={"help": "CPU with glibc: during each training step, blocks up to 32 MiB come from the heap instead of fresh mappings (allocator.heap_blocks; the fixed 64 KiB mmap threshold and malloc_trim come back after the step). A step then takes 0.5-0.6x the time (the kernel no longer faults in every page of every new tensor) and the heap keeps about one step's freed blocks at the step's peak (the memory planner counts them). 'auto': on when the memory available after the first step holds three times that step's peak (allocator.HeapSteps); true or false to choose (docs/BENCHMARKS.md, 'CPU speed')."})
    train_dtype: str = field(default="auto", metadata={"help": "Dtype of the frozen weights' matrix products in training steps (lowp.py): auto (bfloat16 on a CPU with AVX512-BF16/AMX for a float32 model of hidden size >= 512, about 1.3x faster steps on SmolLM2; else the compute dtype), float32 or bfloat16. Scoring and the stop rule always run in the compute dtype."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward: less memory, ~30% slower; worth it for 7B+."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the model repository (off unless you trust it)."})
    precision_check: str = field(default="auto", metadata={"help": "With a 4-bit base, also train and score the adapter through a full-precision copy of the base (what a merge gives), so samples count as forgotten only when forgotten in both: 'auto' (when the copy fits in free memory), 'on' or 'off'."})
    view_schedule: str = field(default="turns", metadata={"help": "With precision_check, which other view each step's second pass goes through: 'turns' (full precision and merged NF4 in turn) or 'lag' (the view whose forget set was furthest from the band's inner part at the last scoring; in turn when they are level)."})
    view_retain: bool = field(default=True, metadata={"help": "With precision_check, the retain terms (neighbour NLL and KL to that view's own base) also go through the other precision of each step, not the forget term alone: held in the 4-bit view only, the adapter raised never-seen text of the request's kind by 0.6 nats in the full-precision view (0.1 in the 4-bit one) and the views ended 0.8 nats apart on the forget set, too far for every sample to sit inside the band in all of them (docs/CHANGELOG.md, 'Every view held'). Costs one more forward and backward pass of the neighbours per step (1.36x the step's time on a GPT-2 2 x 128 request, fewer steps overall on the matrix)."})

    # --- LoRA ---
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_layers: int = field(default=0, metadata={"help": "LoRA only in the last N decoder layers (0: all); backward stops there: faster, less memory."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    init_adapter: Optional[str] = field(default=None, metadata={"help": "Start the LoRA weights from this forget adapter (same LoRA settings) instead of zero: the forget ledger warm-starts each consolidation from the last one."})
    target_modules: Any = field(default="all-linear", metadata={"help": "Modules that get LoRA: 'all-linear' or a list of module names."})

    # --- data ---
    max_length: int = field(default=200, metadata={"help": "Samples longer than this many tokens are truncated (ICU: 200)."})
    text_field: str = field(default="text", metadata={"help": "Field (jsonl) or column (csv) holding the text."})
    hash_salt: Optional[str] = field(default=None, metadata={"help": "Salt for sample ids (hex); random per request when unset."})

    # --- loss (ICU: loss = -u*L_fgt + a*L_lrn + b*L_kl) ---
    method: str = field(default="icu", metadata={"help": "Method (icu-peft methods/): icu (calibrated, default), icu_ga, icu_paper, ga, graddiff, npo, simnpo, undial; see ICUConfig.for_method."})
    forget_loss: str = field(default="target", metadata={"help": "Forget term: 'target' (distil towards never-seen-looking targets), 'ga' (negated NLL, ICU's KUI), 'npo', 'simnpo' or 'undial'."})
    npo_beta: float = field(default=0.1, metadata={"help": "NPO inverse temperature beta."})
    simnpo_beta: float = field(default=2.5, metadata={"help": "SimNPO inverse temperature beta."})
    simnpo_gamma: float = field(default=0.0, metadata={"help": "SimNPO reward margin gamma."})
    rank_by_sharing: int = field(default=0, metadata={"help": "Method icu: rank each forget token for its target by how long a context it shares with the retain / never-seen text (up to this many tokens; shared = template = easy target), then by the base's NLL (0, the default: by the NLL alone). 4 lets a large request of one template forget without taking the kept records along (64 of 256 prescriptions: 18/64 and kept secrets 191/192 against a stop at 0/64), but raises never-seen same-kind perplexity and kept the demo's MA at its edge (docs/BENCHMARKS.md)."})
    target_log_weight: float = field(default=0.3, metadata={"help": "Method icu: weight of the log-space push on tokens still more likely than their target (the BCE alone stalls short of very unlikely targets, and forgotten text keeps its hardest tokens easier than never-seen text's, which Min-K% reads: 0.1 left them 2-3 nats short on tiny memorisers). 0.3 since the loop centres the set in the shipped view, which reins in the loss overshoot that made 0.3 a trade-off before (docs/CHANGELOG.md, 'Centring in the shipped view'); 1.0 overshot."})
    target_pull_weight: float = field(default=0.3, metadata={"help": "Method icu: weight of the same log-space term pulling back the tokens of a sample pushed past the never-seen band (less likely than their targets): the BCE's own pull fades with the probability, and a warm-started ledger consolidation on SmolLM2 sat past the band for 140 steps without it. Only samples past the band: on every sample it slowed the matrix's code request. 0: off."})
    undial_gamma: float = field(default=10.0, metadata={"help": "UNDIAL: how far the true token's logit is lowered in the distillation target."})
    forget_tokens: str = field(default="predicted", metadata={"help": "Tokens the forget term pushes on: 'predicted' (only those the model still gets right) or 'all' (ICU's code)."})
    forget_distinct_ngram: int = field(default=0, metadata={"help": "Forget term skips tokens whose n-gram (token + n-1 before) occurs in the retain pool: shared template, not private text (0: off; 4 suits records)."})
    nll_target: Any = field(default="off", metadata={"help": "After training, scale the adapter so the forget set's mean NLL is near this: 'unseen' (the base's mean NLL on the unseen text), a number of nats, or 'off' (ICU). With precision_check, the mean over every precision view."})
    nll_tolerance: float = field(default=0.5, metadata={"help": "nll_target: a mean NLL this close (nats) needs no scaling."})
    nll_max_scale: float = field(default=2.0, metadata={"help": "nll_target: largest factor the adapter may be scaled up by when forgetting stopped short of the target."})
    nll_probes: int = field(default=6, metadata={"help": "nll_target: bisection steps over the scale (each scores the forget set once)."})
    retain_kl_samples: int = field(default=8, metadata={"help": "Extra random retain samples per step for the NLL/KL terms, beside the neighbours (ICU's code: 0)."})
    forget_weight: float = field(default=1.0, metadata={"help": "u: weight of the gradient-ascent term on the forget samples (KUI)."})
    learn_weight: float = field(default=0.5, metadata={"help": "a: weight of the NLL on each forget sample's neighbours (CLE)."})
    kl_weight: float = field(default=1.0, metadata={"help": "b: weight of KL(p_ref || p_model) on the neighbours (CLE); p_ref = adapter disabled."})
    entropy_weight: float = field(default=1.0, metadata={"help": "Method icu: weight of a two-sided term holding each forget position's next-token entropy at that of the never-seen token whose loss its target took, as the trained model has the never-seen text now (calibrate.entropy_targets; without it forgotten text ends flatter than never-seen text, which Min-K%++ reads). Divided by the retain pressure after retain damage. 0: off."})
    retain_projection: bool = field(default=False, metadata={"help": "Remove from each step's forget gradient its component against the retain terms' gradient when the two conflict (one-sided PCGrad), so a step does not raise the kept text's loss to first order. Off: on the 64-record one-template request it did not prevent the retain damage (0/64 either way; with rank_by_sharing 4, 0/64 against 18/64 without it), docs/BENCHMARKS.md."})
    follow_unseen_loss: bool = field(default=False, metadata={"help": "Method icu: match the per-token loss targets again at every scoring to the never-seen text as the trained model has it (the adapter moves text of the request's kind too). Off: on the validation matrix it left the forgotten text's hardest tokens easier than never-seen text's (Min-K% AUC 0.73-0.94 on 5 rows; docs/CHANGELOG.md, 'Centring in the shipped view'); the centring (recentre) follows the never-seen text instead."})
    tail_gain: float = field(default=0.0, metadata={"help": "Method icu: each scoring round with the loss attack inside its tolerance (settle_auc), the spread of every forget sample's per-token targets around its mean grows by this times (Min-K% attack AUC - 0.5) in the shipped view (hard tokens harder, easy ones easier, same mean); 0 (default) turns it off: at 0.5, with follow_unseen_loss, it chased the AUC's noise on 6-16 samples and doubled the steps (docs/CHANGELOG.md, 'Centring in the shipped view')."})
    tail_attacks: str = field(default="min_k,min_k_plus_plus", metadata={"help": "Method icu: the attacks on each sample's hardest fifth of tokens that the loop steers, comma-separated (min_k: the tail's loss targets; min_k_plus_plus: the tail positions' entropy targets, at most 1 nat a round). Once every sample is inside the band and the loss attack within its tolerance, such an attack (shipped view, against the never-seen samples) outside 0.5 +- settle_auc, or +- the AUC's null standard deviation where the samples are fewer, moves the knob of each sample that stalled on its wrong side half way to the never-seen median, and the request does not settle until it is inside. '' (none): the loss attack alone decides, as before 2026-12-07 (docs/METHOD.md, 'The hardest fifth')."})
    unseen_kl_samples: int = field(default=0, metadata={"help": "Never-seen (--unseen) samples per step held to the reference by a KL term only (no NLL), so text of the request's kind that the model never saw keeps its distribution. Off: side by side on session 32's code it kept the held-out records' perplexity within +3% on 8 of 9 validation-matrix rows (3 of 9 without), but membership attacks found the forget set more often: loss-attack AUC distance from 0.5 0.083 against 0.048 on the matrix, 0.128 against 0.053 against never-seen text the run never saw (docs/CHANGELOG.md, session 32)."})
    target_ma_condition: bool = field(default=True, metadata={"help": "The per-token targets keep at most the never-seen samples' median MA (unlearner.target_ma_max); false: they aim at the band's median loss only. With the never-seen anchor (unseen_kl_samples), false finished a prose request nearer the never-seen text (loss AUC 0.43 against 0.24) but left a logins request partial, 5/6, one sample too familiar in the merged-NF4 view (session 32)."})
    num_neighbours: int = field(default=1, metadata={"help": "Neighbours drawn from the retain pool per forget sample (ICU: 1)."})
    embedder: str = field(default="base", metadata={"help": "Neighbour embeddings: 'base' (the base model's mean-pooled hidden states) or 'sentence-transformers[:PATH]'."})
    embed_tail_tokens: int = field(default=0, metadata={"help": "Embed only the last N tokens of each text (ICU embeds the tail); 0 = whole text."})
    no_retain: str = field(default="generate", metadata={"help": "Without a retain pool: 'generate' (neighbours sampled from the base model itself) or 'refuse'."})
    generated_retain_size: int = field(default=16, metadata={"help": "How many texts to sample from the base when no retain pool is given."})
    loss_chunk_size: int = field(default=64, metadata={"help": "Positions per chunk when computing NLL/KL from hidden states (bounds logits memory)."})

    # --- optimisation ---
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (True) or fine-tune every weight (False; needs quantize=False; a baseline)."})
    iur: bool = field(default=True, metadata={"help": "Per-sample refinement: forgotten samples leave the batch. False: train on all until the means pass (Jang et al.)."})
    hold_forgotten: bool = field(default=False, metadata={"help": "With a two-sided method (icu): samples inside the band stay in the batch, held at their target, instead of leaving it (IUR). Off by default: on the validation matrix it cost steps and centring (prose PrivLeak -45% vs -13%, code 5/6 vs 6/6) though it finished two other memorisers (docs/BENCHMARKS.md)."})
    learning_rate: Any = field(default="auto", metadata={"help": "Adam learning rate, or 'auto': start at lr_start, double while the forget set's distance to the never-seen band stalls, halve when a round overshoots; when the retain set is damaged, restore the last good adapter and undo the last raise, or make the retain terms heavier (retain_pressure). docs/METHOD.md, 'Finding its own settings'."})
    lr_start: float = field(default=2e-4, metadata={"help": "learning_rate auto: the first rate tried."})
    lr_max: float = field(default=5e-2, metadata={"help": "learning_rate auto: the rate is never raised past this."})
    max_steps: Any = field(default="auto", metadata={"help": "Budget in optimizer steps, or 'auto': 400, plus 50 for every optimizer step an epoch over the request takes beyond the first (64 samples at batch 8: 750), so a large request gets as many passes as it needs (step_budget); a request that reaches it with samples not yet forgotten while still closing in on the band gets half of it again, up to budget_growth x (calibrate.StepBudget). An integer is a hard limit."})
    budget_growth: float = field(default=4.0, metadata={"help": "max_steps auto: the most the budget may grow to, as a multiple of its base, while a request still closes in on the band at its end (1 = never)."})
    round_steps: int = field(default=4, metadata={"help": "Optimizer steps (whole epochs, at least this many steps) between two scorings of the forget set."})
    retain_floor: float = field(default=0.96, metadata={"help": "Retain guard: if the retain set's MA falls below this fraction of its value before, the last good adapter is restored (with lr auto, training goes on with heavier retain terms; else it stops). A state counts as a restore point, and the rate may rise, only half way or less from where it was to this floor (0.96: at 98% or more of before)."})
    retain_pressure: float = field(default=4.0, metadata={"help": "learning_rate auto: after each restore forced by retain damage, the neighbour NLL and KL weights are multiplied by this (1 = never)."})
    adam_betas: Any = field(default=(0.9, 0.98), metadata={"help": "Adam betas (ICU: 0.9, 0.98)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    batch_size: int = field(default=8, metadata={"help": "Forget samples per optimisation step (ICU: 8)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm; 0 disables."})
    max_epochs: Optional[int] = field(default=None, metadata={"help": "Epoch cap (None: only max_steps bounds the work; ICU's code has none)."})
    min_epochs: int = field(default=0, metadata={"help": "Train at least this many epochs even when every sample already passes."})
    seed: int = field(default=42, metadata={"help": "Random seed (data order, LoRA init, generated retain pool)."})

    # --- IUR: who counts as forgotten ---
    criterion: str = field(default="ma_el", metadata={"help": "'ma_el': MA and EL_n at or below thresholds; 'bleu': ICU's generated-suffix BLEU criterion."})
    el_n: int = field(default=10, metadata={"help": "n of the extraction likelihood EL_n."})
    lazy_el: bool = field(default=True, metadata={"help": "During IUR compute EL_n only for samples whose MA passes (one failing MA is not forgotten anyway); final scores are complete."})
    el_each_round: bool = field(default=False, metadata={"help": "With a never-seen band: measure EL_n at every scoring round for the samples whose MA and NLL are inside. Off: such a sample counts as under the EL_n edge until a round that would stop (or keep a new best state) measures every view completely, and a sample found over the edge there is measured at every round after. EL_n's roll-outs were most of a round's cost."})
    neighbour_micro_batch: int = field(default=4, metadata={"help": "Neighbour sequences per forward/backward pass (0: all at once, as ICU's code); same gradient, less activation memory."})
    kl_anchor: bool = field(default=True, metadata={"help": "With a linear output head, the retain KL takes the reference from two numbers per position and one hidden-size vector kept per sample (within reference_cache_mb), not from its vocabulary-sized logits at every step: the same KL and gradient (losses.reference_anchor)."})
    reference_cache_mb: int = field(default=512, metadata={"help": "Memory (MB, CPU) for keeping the frozen reference's hidden states of samples already seen (0: recompute every step)."})
    dequant_cache_mb: Any = field(default="auto", metadata={"help": "Memory (MB) for dequantized copies of the 4-bit base's weights (and of the merged-NF4 view's), made once per request instead of at every forward: bitsandbytes has no 4-bit kernel on the CPU. 'auto': a quarter of the memory available on the CPU, none on CUDA; 0: off."})
    prefix_cache_mb: int = field(default=512, metadata={"help": "Memory (MB, CPU) for the hidden states below the lowest trained layer, so steps run only the layers with LoRA (0: run every layer every step)."})
    retain_el: bool = field(default=False, metadata={"help": "Also score EL_n of the retain samples in the report (slow once retain text drifts: a roll-out per departure)."})
    el_start: int = field(default=1, metadata={"help": "Shortest prefix scored by EL_n (Jang: 1; ICU's code: 150 of 200)."})
    band_quantile: float = field(default=0.1, metadata={"help": "Never-seen band: a sample is forgotten when its NLL lies between the unseen samples' q and 1-q quantiles and its MA / EL_n are no higher than any unseen sample's."})
    patience_steps: int = field(default=0, metadata={"help": "Once every sample has been inside the band, stop after this many steps without a better state (more samples inside, or a loss attack closer to AUC 0.5) and keep the best one. 0 = auto: half the steps it took to get every sample inside, at least 5 scoring rounds."})
    settle_auc: float = field(default=0.1, metadata={"help": "A two-sided method also stops only when a loss attack tells the forget set from the never-seen text no better than ROC-AUC 0.5 +- this (from NLLs already scored; 0.5 turns the check off); where the forget and never-seen samples are too few for it, the smallest distance from 0.5 that a set drawn like never-seen text comes within at least half the time (calibrate.loss_tolerance: 0.1875 for 2 samples against 8)."})
    settle_quantile: float = field(default=0.25, metadata={"help": "A sample leaves the batch once its NLL lies between these (tighter) quantiles, so the set ends mid-band, not at its edge."})
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
        if isinstance(self.learning_rate, str) and self.learning_rate != "auto":
            try:
                self.learning_rate = float(self.learning_rate)
            except ValueError:
                pass
        if isinstance(self.max_steps, str) and self.max_steps != "auto":
            try:
                self.max_steps = int(self.max_steps)
            except ValueError:
                pass
        if isinstance(self.nll_target, str) and self.nll_target not in ("off", "unseen"):
            try:  # from the command line every value is a string
                self.nll_target = float(self.nll_target)
            except ValueError:
                pass  # validate() names the field
        self.validate()

    def steered_tails(self) -> List[str]:
        """The attacks named in tail_attacks, in order, without blanks."""
        return [a.strip() for a in str(self.tail_attacks or "").split(",") if a.strip()]

    def validate(self) -> None:
        """Raise InputError with a one-line message for any out-of-range value."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InputError(f"invalid config: {msg}")

        need(self.lora_r > 0, "lora_r must be > 0")
        need(self.max_length > self.el_n + 1, "max_length must exceed el_n + 1")
        need(self.el_n >= 1, "el_n must be >= 1")
        need(0 <= self.rank_by_sharing <= 16, "rank_by_sharing must be in [0, 16]")
        need(self.el_start >= 1, "el_start must be >= 1")
        need(self.batch_size >= 1, "batch_size must be >= 1")
        need(self.num_neighbours >= 0, "num_neighbours must be >= 0")
        need(self.learning_rate == "auto" or (_is_number(self.learning_rate) and self.learning_rate <= 1e6),
             "learning_rate must be 'auto' or a number in (0, 1e6]")
        need(0 < self.lr_start <= self.lr_max <= 10, "need 0 < lr_start <= lr_max <= 10")
        need(self.max_epochs is None or self.max_epochs >= 0, "max_epochs must be >= 0")
        need(self.max_steps == "auto" or (isinstance(self.max_steps, int) and not isinstance(self.max_steps, bool)
                                          and self.max_steps >= 0), "max_steps must be 'auto' or an integer >= 0")
        need(isinstance(self.budget_growth, (int, float)) and not isinstance(self.budget_growth, bool)
             and 1 <= self.budget_growth <= 100, "budget_growth must be a number from 1 to 100")
        need(self.round_steps >= 1, "round_steps must be >= 1")
        need(self.cpu_heap_steps in ("auto", True, False), "cpu_heap_steps must be 'auto', true or false")
        need(0 <= self.retain_floor < 1, "retain_floor must be in [0, 1)")
        need(1 <= self.retain_pressure <= 100, "retain_pressure must be in [1, 100]")
        need(0 < self.settle_auc <= 0.5, "settle_auc must be in (0, 0.5]")
        need(self.patience_steps >= 0, "patience_steps must be >= 0 (0: auto)")
        need(0 <= self.band_quantile <= self.settle_quantile < 0.5,
             "need 0 <= band_quantile <= settle_quantile < 0.5")
        need(self.simnpo_beta > 0 and self.npo_beta > 0 and self.undial_gamma > 0,
             "simnpo_beta, npo_beta and undial_gamma must be > 0")
        need(self.loss_chunk_size >= 1, "loss_chunk_size must be >= 1")
        need(self.criterion in ("ma_el", "bleu"), "criterion must be 'ma_el' or 'bleu'")
        need(self.forget_loss in FORGET_LOSSES, f"forget_loss must be one of {', '.join(FORGET_LOSSES)}")
        need(self.forget_tokens in ("all", "predicted"), "forget_tokens must be 'all' or 'predicted'")
        need(self.use_lora or not self.quantize, "full fine-tuning (use_lora=False) needs quantize=False")
        need(self.nll_target in ("off", "unseen") or _is_number(self.nll_target),
             "nll_target must be 'off', 'unseen' or a positive number")
        need(self.nll_tolerance >= 0 and self.nll_max_scale >= 1 and self.nll_probes >= 0,
             "nll_tolerance and nll_probes must be >= 0, nll_max_scale >= 1")
        need(self.entropy_weight >= 0, "entropy_weight must be >= 0")
        need(self.target_log_weight >= 0 and self.target_pull_weight >= 0,
             "target_log_weight and target_pull_weight must be >= 0")
        need(0 <= self.tail_gain <= 10, "tail_gain must be in [0, 10]")
        need(self.retain_kl_samples >= 0 and self.unseen_kl_samples >= 0, "retain_kl_samples and unseen_kl_samples must be >= 0")
        need(self.neighbour_micro_batch >= 0, "neighbour_micro_batch must be >= 0")
        need(self.reference_cache_mb >= 0 and self.prefix_cache_mb >= 0, "reference_cache_mb and prefix_cache_mb must be >= 0")
        need(self.dequant_cache_mb in ("auto", 0) or _is_number(self.dequant_cache_mb),
             "dequant_cache_mb must be 'auto' or a number >= 0")
        need(self.no_retain in ("generate", "refuse"), "no_retain must be 'generate' or 'refuse'")
        need(self.view_schedule in ("turns", "lag"), "view_schedule must be 'turns' or 'lag'")
        need(self.precision_check in PRECISION_CHECKS, f"precision_check must be one of {', '.join(PRECISION_CHECKS)}")
        need(self.compute_dtype in ("auto", "float32", "bfloat16", "float16"), "compute_dtype must be auto, float32, bfloat16 or float16")
        need(self.train_dtype in ("auto", "float32", "bfloat16"), "train_dtype must be auto, float32 or bfloat16")
        need(len(tuple(self.adam_betas)) == 2, "adam_betas must have two values")
        need(all(a in TAIL_ATTACKS for a in self.steered_tails()),
             f"tail_attacks must be a comma-separated subset of {', '.join(TAIL_ATTACKS)} (or empty)")
        need(self.embedder == "base" or self.embedder.startswith("sentence-transformers"),
             "embedder must be 'base' or 'sentence-transformers[:PATH]'")

    @staticmethod
    def method_preset(method: str) -> dict:
        """Field values of a method (icu_peft/methods/: each method's module holds its preset)."""
        from .methods import METHODS  # torch-heavy: not at import time, so CLI parsing stays light

        if method not in METHODS:
            raise InputError(f"unknown method '{method}': choose from {', '.join(METHODS)}")
        return {"method": method, **METHODS[method].preset}

    def step_budget(self, forget_samples: int) -> int:
        """max_steps for a request of this many samples (see the field's help)."""
        if self.max_steps != "auto":
            return int(self.max_steps)
        per_epoch = max(1, math.ceil(forget_samples / self.batch_size))
        return 400 + 50 * (per_epoch - 1)

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
