"""The SAE variant of the bottleneck: a top-k sparse autoencoder read beside a site, not in its place.

The seed paper names two instruments, codebook features and sparse autoencoders. A codebook replaces
the site's output with a combination of codes, so the model must be taught to read codes (a
recovery LoRA) and pays a perplexity cost. An SAE here is used the way unlearning work with SAEs uses
it: the state h is encoded into features f = TopK(ReLU(W_enc (h/s - b_dec) + b_enc)), and a forget
request subtracts the decoder directions of its masked features only,

    h' = h - s * sum_{j masked} g * f_j * W_dec[j]        (g = 1: 'zero', the feature removed;
                                                            g = 2: 'negate', the feature flipped)

so everything the SAE does not reconstruct (its error term) and every unmasked feature pass through
untouched: with no mask the model is the base, bit for bit, and an SAE costs no perplexity and needs
no recovery training. It trains on hidden states alone (no LM loss), a few minutes on a CPU.

Top-k (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") rather than an L1 penalty:
the sparsity is a setting (k, as for the codebook) instead of a coefficient tuned per model, and the
recorded "active features" of a position are its top-k, exactly like a codebook's top-k codes, so
counting and selecting a topic's features is the codebook's code unchanged.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .layer import massive_positions

# ------------------------------------------------------------------------------ pure functions


def sae_encode(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor,
               k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k strongest features of each row of x (unit-scale states); ids of
    features whose activation is 0 after the ReLU are -1 (not active)."""
    pre = F.relu((x - b_dec) @ w_enc.T + b_enc)
    vals, idx = pre.topk(k, dim=-1)
    return vals, idx.masked_fill(vals <= 0, -1)


def sae_decode(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_dec + sum_i vals_i * W_dec[idx_i] (ids -1 contribute nothing)."""
    vecs = F.embedding(idx.clamp(min=0), w_dec)
    return b_dec + ((vals * (idx >= 0).to(vals.dtype)).unsqueeze(-1) * vecs).sum(-2)


def fraction_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Reconstruction error relative to the states' own variance (0: perfect, 1: no better than the mean)."""
    return ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum().clamp(min=1e-12)


# ------------------------------------------------------------------------------ the module


class SAELayer(nn.Module):
    """A top-k SAE of `num_features` features over states of width `dim`; called from the same forward
    hook as a codebook (layer.attach), with the same mask / record interface."""

    def __init__(self, num_features: int, dim: int, k: int = 8):
        super().__init__()
        self.k = k
        self.w_enc = nn.Parameter(torch.zeros(num_features, dim))
        self.b_enc = nn.Parameter(torch.zeros(num_features))
        self.w_dec = nn.Parameter(torch.zeros(num_features, dim))
        self.b_dec = nn.Parameter(torch.zeros(dim))
        # States are divided by `scale` (their RMS per coordinate) so that one learning rate fits any model.
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("gain", torch.zeros(num_features))  # 0: untouched, 1: removed, 2: flipped
        self.enabled = True
        self.passthrough_ratio = 0.0
        self.record: Optional[List[torch.Tensor]] = None

    @property
    def num_codes(self) -> int:
        return self.w_enc.shape[0]

    def tensors(self) -> dict:
        return {"w_enc": self.w_enc, "b_enc": self.b_enc, "w_dec": self.w_dec, "b_dec": self.b_dec, "scale": self.scale}

    def set_mask(self, codes, mode: str = "zero") -> None:
        """Mask features `codes` (ids): 'zero' removes them, 'negate' flips them; an empty list is the identity."""
        ids = torch.as_tensor(list(codes), dtype=torch.long, device=self.gain.device)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise InputError(f"feature ids must be in [0, {self.num_codes}); got {int(ids.min())}..{int(ids.max())}")
        if mode not in ("zero", "negate"):
            raise InputError(f"an SAE's features can be zeroed or negated, not {mode!r}")
        self.gain.zero_()
        self.gain[ids] = 1.0 if mode == "zero" else 2.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        masked = bool(self.gain.any())
        if not masked and self.record is None:
            return h  # nothing to subtract, nothing to count: the base exactly, at no cost
        with torch.no_grad():
            x = h.detach().float() / self.scale
            vals, idx = sae_encode(x, self.w_enc.float(), self.b_enc.float(), self.b_dec.float(), self.k)
            through = massive_positions(h.detach(), self.passthrough_ratio)
            if through is not None:
                idx = idx.masked_fill(through.unsqueeze(-1), -1)
            if self.record is not None:
                self.record.append(idx.cpu())
            if not masked:
                return h
            g = self.gain[idx.clamp(min=0)] * (idx >= 0).to(vals.dtype)
            sub = (((vals * g).unsqueeze(-1)) * F.embedding(idx.clamp(min=0), self.w_dec.float())).sum(-2) * self.scale
        return h - sub.to(h.dtype)


# ------------------------------------------------------------------------------ training


def train_sae(x: torch.Tensor, num_features: int, k: int, steps: int, batch_tokens: int, lr: float,
              dead_interval: int = 50, seed: int = 0, progress: bool = False, desc: str = "sae",
              device=None) -> Tuple[SAELayer, dict]:
    """A top-k SAE fitted to the rows of x (hidden states, any scale); returns (layer, stats).

    Init: decoder rows random unit vectors, encoder = decoder (tied at the start), b_dec the mean
    state. Each step: relative MSE on a random batch, Adam, decoder rows renormalised to unit length
    (so a feature's size lives in its activation, and activations compare across features). Features
    that fired on no row for `dead_interval` steps are moved onto the current batch's worst-reconstructed
    residuals. `device`: where to train (the model's device: an 8B model's states on a CPU would take
    hours); the states and the SAE stay there.
    """
    from tqdm.auto import tqdm

    if x.shape[0] < 2:
        raise InputError("an SAE needs at least 2 hidden states to train on")
    if not 1 <= k < num_features:
        raise InputError("k must be in [1, num_features)")
    g = torch.Generator().manual_seed(seed)
    x = x.float().to(device) if device is not None else x.float()
    scale = x.pow(2).mean().sqrt().clamp(min=1e-6)
    xs = x / scale
    n_hold = max(1, min(x.shape[0] // 10, 4096))
    perm = torch.randperm(xs.shape[0], generator=g).to(x.device)
    held, train = xs[perm[:n_hold]], xs[perm[n_hold:]] if xs.shape[0] > n_hold else xs
    layer = SAELayer(num_features, x.shape[1], k).to(x.device)
    with torch.no_grad():
        d = torch.randn(num_features, x.shape[1], generator=g).to(x.device)
        d = d / d.norm(dim=-1, keepdim=True)
        layer.w_dec.copy_(d)
        layer.w_enc.copy_(d)
        layer.b_dec.copy_(train.mean(0))
        layer.scale.fill_(float(scale))
    params = [layer.w_enc, layer.b_enc, layer.w_dec, layer.b_dec]
    opt = torch.optim.Adam(params, lr=lr)
    last_active = torch.zeros(num_features, dtype=torch.long, device=x.device)
    reseeded, fvu = 0, None
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = train[torch.randint(0, train.shape[0], (min(batch_tokens, train.shape[0]),), generator=g).to(x.device)]
        vals, idx = sae_encode(batch, layer.w_enc, layer.b_enc, layer.b_dec, k)
        x_hat = sae_decode(vals, idx, layer.w_dec, layer.b_dec)
        loss = fraction_unexplained(batch, x_hat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            layer.w_dec.div_(layer.w_dec.norm(dim=-1, keepdim=True).clamp(min=1e-8))
            fired = idx[idx >= 0].unique()
            last_active[fired] = step + 1
            if dead_interval and (step + 1) % dead_interval == 0 and step + 1 < steps:
                dead = (step + 1 - last_active) >= dead_interval
                reseeded += _reseed_dead_features(layer, opt, dead, batch, batch - x_hat.detach(), g)
                last_active[dead] = step + 1
        bar.set_postfix(fvu=f"{float(loss.detach()):.3f}")
    bar.close()
    with torch.no_grad():
        vals, idx = sae_encode(held, layer.w_enc, layer.b_enc, layer.b_dec, k)
        fvu = float(fraction_unexplained(held, sae_decode(vals, idx, layer.w_dec, layer.b_dec)))
        used = int(idx[idx >= 0].unique().numel())
    for p in params:
        p.requires_grad_(False)
    return layer, {"fvu_held_out": round(fvu, 4), "held_out_states": n_hold, "train_states": int(train.shape[0]),
                   "features_used_held_out": used, "dead_features_reseeded": reseeded, "scale": round(float(scale), 4)}


def _reseed_dead_features(layer: SAELayer, opt, dead: torch.Tensor, batch: torch.Tensor, resid: torch.Tensor,
                          g: torch.Generator) -> int:
    """Point dead features at the worst-reconstructed states of the batch (their residual direction) and
    reset their Adam state."""
    n = int(dead.sum())
    if n == 0:
        return 0
    worst = resid.pow(2).sum(-1).topk(min(n, resid.shape[0])).indices
    pick = worst[torch.randint(0, worst.numel(), (n,), generator=g).to(worst.device)]
    d = resid[pick]
    d = d / d.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    rows = dead.nonzero().squeeze(-1)
    layer.w_dec[rows] = d
    layer.w_enc[rows] = d
    layer.b_enc[rows] = 0
    for p in (layer.w_enc, layer.b_enc, layer.w_dec):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][rows] = 0
    return n
