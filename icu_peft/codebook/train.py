"""Training the codebook bottleneck once, on general text, with the base frozen.

Read top to bottom: windows -> base perplexity -> hidden states at each bottleneck layer -> k-means
init -> [step: LM loss through the bottlenecks + reconstruction loss -> AdamW on the codes; every
`dead_code_interval` steps re-seed codes nobody used] -> perplexity with the bottleneck -> save.

The SAE kind (`kind="sae"`) stops after the hidden states: one top-k SAE per layer is fitted to them
(sae.train_sae); the base's forward pass is not in its loop, and with no mask the model is the base.

With `recovery_lora_r` > 0 a LoRA in the decoder layers after the bottleneck trains jointly with the
codes on the same loss (the base's own weights stay frozen), so that those layers learn to read the
snapped states; it is saved as a PEFT adapter in CODEBOOK_DIR/recovery/ and removed from the model
afterwards.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..adapters import check_output_dir
from ..data import pad_batch
from ..errors import InputError
from ..losses import chunked_token_nll
from ..metrics import backbone_and_head, model_device
from ..models import base_fingerprint
from ..adapters import utc_now
from .api import RECOVERY_ADAPTER, RECOVERY_DIR, save_codebook
from .config import CodebookConfig
from .evaluate import lm_scores, windows
from .layer import (CodebookLayer, attach, capture, count_code_activations, decoder_layers, kmeans, massive_positions,
                    resolve_layers, site_module)

logger = logging.getLogger("icu_peft")


class _Stop(Exception):
    """Raised from the capture hook: nothing above the bottleneck layer is needed for k-means."""


@dataclass
class CodebookResult:
    layers: list  # one stage (CodebookLayer or SAELayer) per bottleneck layer
    layer_indices: List[int]
    manifest: dict
    output_dir: Optional[Path] = None

    @property
    def layer(self):
        return self.layers[0]

    @property
    def layer_index(self) -> int:
        return self.layer_indices[0]


@torch.no_grad()
def collect_hidden(model, seqs: Sequence[torch.Tensor], pad_id: int, layer_index: int, max_tokens: int,
                   batch_size: int = 8, passthrough_ratio: float = 0.0, site: str = "residual") -> torch.Tensor:
    """Outputs of the `site` of decoder layer `layer_index` at real (non-pad) positions, up to max_tokens rows
    (without the massive positions the bottleneck passes through, when passthrough_ratio > 0)."""
    device = model_device(model)
    sink: List[torch.Tensor] = []
    rows: List[torch.Tensor] = []
    total = 0

    def stop_after(module, args, output):
        raise _Stop

    # Registered after the capture hook on the same module, so the output is recorded before the stop.
    handle = capture(model, layer_index, sink, site)
    stopper = site_module(model, layer_index, site).register_forward_hook(stop_after)
    try:
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[s:s + batch_size], pad_id)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device))
            except _Stop:
                pass
            h = sink.pop()
            real = mask.to(device).bool()
            if passthrough_ratio > 0:  # k-means on the states the bottleneck will snap, not the sinks
                real = real & ~massive_positions(h, passthrough_ratio)
            rows.append(h[real].float().cpu())
            total += rows[-1].shape[0]
            if total >= max_tokens:
                break
    finally:
        handle.remove()
        stopper.remove()
    return torch.cat(rows)[:max_tokens]


def _lm_and_recon(model, layers: List[CodebookLayer], seqs: Sequence[torch.Tensor], pad_id: int, config: CodebookConfig):
    """(LM loss, reconstruction loss summed over the stages, per stage: (code ids, hidden states) at the snapped positions)."""
    device = model_device(model)
    ids, mask = (t.to(device) for t in pad_batch(seqs, pad_id))
    parts = backbone_and_head(model)
    if parts is None:
        raise InputError("this model post-processes its logits; codebook training needs a plain LM head")
    backbone, head = parts
    h_last = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    s, c = chunked_token_nll(h_last, head, ids, mask, config.loss_chunk_size)
    lm = s / c.clamp(min=1)
    recon, used = 0.0, []
    for layer in layers:
        h, q, idx = layer.last
        valid = mask.bool() & (idx[..., 0] >= 0)  # passed-through (massive) positions are not reconstructed
        hv, qv = h[valid].float(), q[valid].float()
        # Relative MSE: scale-free, so one weight fits any model's residual norm.
        recon = recon + ((qv - hv.detach()) ** 2).sum() / (hv.detach() ** 2).sum().clamp(min=1e-6)
        used.append((idx[valid], hv.detach()))
    return lm, recon, used


def train_codebook(config: CodebookConfig, texts: Sequence[str], base_model, tokenizer,
                   eval_texts: Optional[Sequence[str]] = None, output_dir: Optional[str | Path] = None,
                   overwrite: bool = False, base_name: Optional[str] = None) -> CodebookResult:
    """Train a codebook (or SAE) on `texts` for the frozen `base_model`; save it to `output_dir` if given."""
    t0 = time.time()
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    pad_id = tokenizer.pad_token_id
    layer_indices = resolve_layers(base_model, config.layer, config.layers)
    if config.recovery_lora_r:  # fail before any heavy work
        _check_recovery_target(base_model, layer_indices[0])
    for i in layer_indices:
        site_module(base_model, i, config.site)
    seqs = windows(tokenizer, texts, config.max_length)
    if not seqs:
        raise InputError("no training text left after tokenization (texts shorter than 8 tokens?)")
    seqs = [seqs[i] for i in torch.randperm(len(seqs), generator=g).tolist()]
    if eval_texts:
        eval_seqs = windows(tokenizer, eval_texts, config.max_length)
    else:
        n_eval = int(len(seqs) * config.eval_fraction)
        eval_seqs, seqs = seqs[:n_eval], seqs[n_eval:]
    if not seqs:
        raise InputError("no training windows left after holding out the eval share")
    logger.info("%s: layers %s (%s), %d entries each, top-%d; %d training windows, %d eval windows",
                "SAE" if config.kind == "sae" else "codebook", layer_indices, config.site, config.num_codes, config.k,
                len(seqs), len(eval_seqs))
    base_model.eval()
    base_eval = lm_scores(base_model, eval_seqs, pad_id) if eval_seqs else None
    if config.kind == "sae":
        return _train_sae_stages(config, base_model, base_name, layer_indices, seqs, eval_seqs, eval_texts, base_eval,
                                 pad_id, output_dir, overwrite, t0)

    # k-means initialisation on each layer's own hidden states
    layers = []
    for i in layer_indices:
        hidden = collect_hidden(base_model, seqs, pad_id, i, config.kmeans_tokens,
                                passthrough_ratio=config.passthrough_norm_ratio, site=config.site)
        init = kmeans(hidden, config.num_codes, config.kmeans_iters, config.similarity, config.seed)
        del hidden
        layer = CodebookLayer(config.num_codes, init.shape[1], config.k, config.similarity, config.combine)
        layer.passthrough_ratio = config.passthrough_norm_ratio
        with torch.no_grad():
            layer.weight.copy_(init)
        layers.append(layer)
    hooks = [attach(base_model, layer, i, config.site) for layer, i in zip(layers, layer_indices)]
    init_eval = lm_scores(base_model, eval_seqs, pad_id) if eval_seqs else None

    # The recovery LoRA is injected in place (the forward passes below still go through base_model)
    # and is a no-op until its first step (PEFT starts lora_B at zero), so init_eval above is unaffected.
    recovery = _attach_recovery(base_model, layer_indices[0], config) if config.recovery_lora_r else None
    try:
        history, replaced_total = _train_steps(base_model, layers, recovery, seqs, pad_id, config, g)
        cb_eval = lm_scores(base_model, eval_seqs, pad_id) if eval_seqs else None
        used_eval = _codes_used(base_model, layers, eval_seqs or seqs[:32], pad_id)
        manifest = _manifest(config, base_model, base_name, layer_indices, seqs, eval_seqs, eval_texts, history,
                             replaced_total, base_eval, init_eval, cb_eval, used_eval, recovery, t0)
        out = None
        if output_dir is not None:
            manifest = save_codebook(layers, config, layer_indices, manifest, output_dir, overwrite, recovery=recovery)
            out = Path(output_dir)
    finally:
        for hook in hooks:
            hook.remove()
        if recovery is not None:
            # Put the base's own linear layers back: the caller gets its model as it was.
            recovery.unload()
    return CodebookResult(layers, layer_indices, manifest, out)


def _train_sae_stages(config, base_model, base_name, layer_indices, seqs, eval_seqs, eval_texts, base_eval,
                      pad_id, output_dir, overwrite, t0) -> CodebookResult:
    """One top-k SAE per layer, fitted to that layer's hidden states (sae.train_sae)."""
    from .sae import train_sae

    layers, stats = [], []
    for n, i in enumerate(layer_indices):
        hidden = collect_hidden(base_model, seqs, pad_id, i, config.sae_tokens,
                                passthrough_ratio=config.passthrough_norm_ratio, site=config.site)
        layer, st = train_sae(hidden, config.num_codes, config.k, config.steps, config.sae_batch_tokens,
                              config.learning_rate, config.dead_code_interval, config.seed + n, config.progress,
                              desc=f"sae layer {i}", device=model_device(base_model))
        del hidden
        layer.passthrough_ratio = config.passthrough_norm_ratio
        logger.info("SAE at layer %d: fraction of variance unexplained %.3f on %d held-out states, %d features used",
                    i, st["fvu_held_out"], st["held_out_states"], st["features_used_held_out"])
        layers.append(layer)
        stats.append(dict(st, layer=i))
    hooks = [attach(base_model, layer, i, config.site) for layer, i in zip(layers, layer_indices)]
    try:
        used_eval = _codes_used(base_model, layers, eval_seqs or seqs[:32], pad_id)
    finally:
        for hook in hooks:
            hook.remove()
    # With no mask an SAE stage returns its input unchanged (sae.SAELayer.forward): the perplexity is the base's.
    manifest = _manifest(config, base_model, base_name, layer_indices, seqs, eval_seqs, eval_texts, [], 0, base_eval,
                         None, base_eval, used_eval, None, t0)
    manifest["training"]["sae"] = stats
    out = None
    if output_dir is not None:
        manifest = save_codebook(layers, config, layer_indices, manifest, output_dir, overwrite)
        out = Path(output_dir)
    return CodebookResult(layers, layer_indices, manifest, out)


def _check_recovery_target(model, layer_index: int) -> None:
    """A recovery LoRA needs a plain base and at least one decoder layer after the bottleneck."""
    if hasattr(model, "peft_config"):
        raise InputError("recovery_lora_r needs a plain base model (this one already carries PEFT adapters)")
    if layer_index >= len(decoder_layers(model)) - 1:
        raise InputError(f"recovery_lora_r needs decoder layers after the bottleneck; layer {layer_index} is the last")


def _attach_recovery(model, layer_index: int, config: CodebookConfig):
    """A fresh LoRA (PEFT) in every decoder layer after the bottleneck: those must learn to read the codes."""
    from ..models import attach_lora

    after = len(decoder_layers(model)) - 1 - layer_index  # >= 1: checked by _check_recovery_target
    peft_model = attach_lora(model, r=config.recovery_lora_r, alpha=config.recovery_lora_alpha, last_layers=after,
                             adapter_name=RECOVERY_ADAPTER)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("recovery LoRA r=%d in layers %d-%d: %d trainable parameters", config.recovery_lora_r,
                layer_index + 1, layer_index + after, n)
    return peft_model


def _train_steps(model, layers: List[CodebookLayer], recovery, seqs, pad_id: int, config: CodebookConfig,
                 g: torch.Generator):
    """The optimisation loop: the code vectors (and the recovery LoRA) move, the base stays frozen."""
    from tqdm.auto import tqdm

    for layer in layers:
        layer.keep_last = True
    groups = [{"params": [layer.weight for layer in layers], "lr": config.learning_rate}]
    if recovery is not None:
        groups.append({"params": [p for p in recovery.parameters() if p.requires_grad],
                       "lr": config.recovery_learning_rate})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    usage = [torch.zeros(config.num_codes, dtype=torch.long) for _ in layers]
    replaced_total, history = 0, []
    try:
        bar = tqdm(range(config.steps), desc="codebook", disable=not config.progress, leave=False, dynamic_ncols=True)
        for step in bar:
            batch_idx = torch.randint(0, len(seqs), (config.batch_size,), generator=g).tolist()
            lm, recon, used = _lm_and_recon(model, layers, [seqs[i] for i in batch_idx], pad_id, config)
            loss = lm + config.recon_weight * recon
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            reseed = config.dead_code_interval and (step + 1) % config.dead_code_interval == 0 and step + 1 < config.steps
            for layer, count, (idx, h_now) in zip(layers, usage, used):
                ids = idx.reshape(-1).cpu()
                count += torch.bincount(ids[ids >= 0], minlength=config.num_codes)
                if reseed:
                    replaced_total += _reseed_dead(layer, optimizer, count == 0, h_now, g)
                    count.zero_()
            history.append({"step": step + 1, "lm": round(float(lm.detach()), 4), "recon": round(float(recon.detach()), 4)})
            bar.set_postfix(lm=f"{float(lm.detach()):.3f}", recon=f"{float(recon.detach()):.3f}")
        bar.close()
    finally:
        for layer in layers:
            layer.keep_last, layer.last = False, None
            layer.weight.requires_grad_(False)
        if recovery is not None:
            for p in recovery.parameters():
                p.requires_grad_(False)
    return history, replaced_total


def _manifest(config, base_model, base_name, layer_indices, seqs, eval_seqs, eval_texts, history, replaced_total,
              base_eval, init_eval, cb_eval, used_eval, recovery, t0) -> dict:
    from ..unlearner import library_versions, peak_memory_mb

    def ppl(s):
        return None if s is None else {"nll": round(s["nll"], 4), "ppl": round(s["ppl"], 3), "ma": round(s["ma"], 4),
                                       "tokens": s["tokens"]}

    manifest = {
        "request_id": str(uuid.uuid4()),
        "created_at": utc_now(),
        "base": {"name_or_path": base_name or getattr(base_model.config, "_name_or_path", None),
                 "quantized": bool(getattr(base_model, "is_loaded_in_4bit", False)),
                 "fingerprint": base_fingerprint(base_model)},
        "config": config.to_dict(),
        "layer_index": layer_indices[0],
        "layer_indices": list(layer_indices),
        "training": {"windows": len(seqs), "steps": config.steps, "dead_codes_reseeded": replaced_total,
                     "final": history[-1] if history else None, "history_every_10": history[::10]},
        "perplexity": {"eval_windows": len(eval_seqs), "eval_source": "file" if eval_texts else "held-out share",
                       "base": ppl(base_eval), "kmeans_init": ppl(init_eval), "codebook": ppl(cb_eval),
                       "codes_used_on_eval": used_eval},
        "wall_time_s": round(time.time() - t0, 2),
        **{k: round(v, 1) for k, v in peak_memory_mb().items()},
        "versions": library_versions(),
    }
    if recovery is not None:
        n_layers = len(decoder_layers(base_model))
        manifest["recovery"] = {"directory": RECOVERY_DIR, "r": config.recovery_lora_r,
                                "alpha": config.recovery_lora_alpha, "layers": [layer_indices[0] + 1, n_layers - 1],
                                "trainable_parameters": sum(p.numel() for n, p in recovery.named_parameters()
                                                            if "lora_" in n)}
    if base_eval and cb_eval and init_eval:
        logger.info("perplexity on %d eval windows: base %.3f, k-means init %.3f, trained codebook%s %.3f",
                    len(eval_seqs), base_eval["ppl"], init_eval["ppl"],
                    " + recovery LoRA" if recovery is not None else "", cb_eval["ppl"])
    return manifest


def _reseed_dead(layer: CodebookLayer, optimizer, dead: torch.Tensor, h: torch.Tensor, g: torch.Generator) -> int:
    """Move unused codes onto random current hidden states (with a little noise) and reset their Adam state."""
    n = int(dead.sum())
    if n == 0 or h.shape[0] == 0:
        return 0
    pick = torch.randint(0, h.shape[0], (n,), generator=g)
    new = h[pick.to(h.device)]
    new = new + 0.01 * new.norm(dim=-1, keepdim=True) / new.shape[-1] ** 0.5 * torch.randn(new.shape, generator=g).to(new)
    rows = dead.nonzero().squeeze(-1).to(layer.weight.device)
    with torch.no_grad():
        layer.weight[rows] = new.to(layer.weight.dtype)
        st = optimizer.state.get(layer.weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][rows] = 0
    return n


def _codes_used(model, layers, seqs: Sequence[torch.Tensor], pad_id: int) -> int:
    """How many codes (features), over every stage, are in some position's top-k on `seqs`."""
    return int((count_code_activations(model, layers, seqs, pad_id)[0] > 0).sum())
