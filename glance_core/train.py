"""Glance training: the plain flow-matching loss at a LoRA's own few sigmas, on one image.

Sigmas are in [0, 1] (x_sigma = (1 - sigma) x0 + sigma noise); the model is any `velocity(x, sigma)`
callable, so the ComfyUI node and the diffusers side share this one loop.
"""
import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import GlanceError

# The official recipes (see the method note); "default" serves families without one.
RECIPES = {
    "qwen-image": dict(rank=32, alpha=128.0, lr=3e-4, weight_decay=0.0, caption_dropout=0.1),
    "flux.1-dev": dict(rank=16, alpha=64.0, lr=5e-4, weight_decay=0.01, caption_dropout=0.0),
    "default": dict(rank=16, alpha=64.0, lr=5e-4, weight_decay=0.01, caption_dropout=0.0),
}


# The layers each recipe adapts, as diffusers spells module names (ComfyUI's key map knows the same names).
TARGET_PATTERNS = {
    "qwen-image": re.compile(r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|"
                             r"to_out\.0|to_add_out)|img_mlp\.net\.2|txt_mlp\.net\.2|img_mod\.1|txt_mod\.1)$"),
    "flux.1-dev": re.compile(r"(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"),
    "sd3": re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"),
}


class TrainingError(GlanceError):
    """Training cannot go on (non-finite loss, bad settings)."""


@dataclass
class TrainConfig:
    """Settings of one LoRA's training run."""
    steps: int = 60
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.0
    seed: int = 0
    losses: list = field(default_factory=list)


def flow_matching_loss(velocity, x0, noise, sigma):
    """MSE between the predicted velocity at x_sigma and the flow target noise - x0 (sigma: 1-D, in [0, 1])."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    xt = (1 - s) * x0 + s * noise
    return F.mse_loss(velocity(xt, sigma).float(), (noise - x0).float())


def lora_pair_params(down_shape, up_shape, rank, dtype=torch.float32, device="cpu", generator=None):
    """A new trainable (down, up): gaussian down with std 1/rank, zero up, so training starts from the base model."""
    down = torch.randn(down_shape, generator=generator, dtype=torch.float32) / rank
    up = torch.zeros(up_shape, dtype=torch.float32)
    return (torch.nn.Parameter(down.to(device=device, dtype=dtype)),
            torch.nn.Parameter(up.to(device=device, dtype=dtype)))


def train_lora(velocity, params, x0, sigmas, cfg, on_step=None, phase="lora", targets=None):
    """Train `params` for cfg.steps AdamW steps, each at one sigma drawn uniformly from `sigmas`.

    `velocity(xt, sigma, dropped)` runs the model with the LoRA active (`dropped`: use the empty prompt);
    `on_step(i, loss)` is called after every step (it may raise to stop). Returns the per-step losses.
    The objective is the paper's flow-matching loss on x0 with fresh noise, unless `targets` gives, per entry
    of `sigmas`, a fixed (x_sigma, velocity) pair to regress instead (e.g. points of a teacher's trajectory).
    """
    if not sigmas:
        raise TrainingError(f"{phase}: no sigmas to train at")
    if targets is not None and len(targets) != len(sigmas):
        raise TrainingError(f"{phase}: {len(targets)} targets for {len(sigmas)} sigmas")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sig = torch.tensor(sigmas, dtype=torch.float32)
    for i in range(cfg.steps):
        k = torch.randint(len(sig), (1,), generator=gen)
        sigma = sig[k].to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0)
        dropped = bool(torch.rand((), generator=gen) < cfg.caption_dropout)
        model = lambda xt, s: velocity(xt, s, dropped)  # noqa: E731
        if targets is None:
            loss = flow_matching_loss(model, x0, noise, sigma)
        else:
            xt, v = targets[int(k)]
            loss = F.mse_loss(model(xt, sigma).float(), v.float())
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(f"{phase}: the loss became {value} at step {i + 1} of {cfg.steps} (sigma "
                                f"{sigma.item():.4f}); nothing was saved. Lower the learning rate or train in "
                                "float32/bfloat16 rather than float16")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        cfg.losses.append(value)
        if on_step is not None:
            on_step(i, value)
    return cfg.losses
