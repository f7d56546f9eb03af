"""Glance training: the plain flow-matching loss at a LoRA's own few sigmas, on one image.

Sigmas are in [0, 1] (x_sigma = (1 - sigma) x0 + sigma noise); the model is a `velocity(x_sigma, sigma,
dropped)` callable, so the ComfyUI node, the diffusers side and the bundled teacher share this one loop.
What is family-specific (recipe, target layers) lives in `glance_core.families`; the shared preparation and
saving around this loop in `glance_core.plan`.
"""
import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import GlanceError


class TrainingError(GlanceError):
    """Training cannot go on (non-finite loss, bad settings)."""


@dataclass
class TrainConfig:
    """Settings of one LoRA's training run (optimizer and draws); `losses` collects the per-step losses."""
    steps: int = 60
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.0
    seed: int = 0
    # "constant" (the paper's recipe) or "cosine": lr decays to 0 by the last step, so a run of one-item steps
    # ends on an average rather than wherever its last noisy steps left it (what the distillation objective uses)
    lr_decay: str = "constant"
    losses: list = field(default_factory=list)


def noised(x0, noise, sigma):
    """x_sigma = (1 - sigma) x0 + sigma noise, sigma 1-D (one per batch entry) in [0, 1]."""
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - s) * x0 + s * noise


def flow_matching_loss(velocity, x0, noise, sigma):
    """The training loss, defined once: MSE between velocity(x_sigma, sigma) and the flow target noise - x0."""
    return F.mse_loss(velocity(noised(x0, noise, sigma), sigma).float(), (noise - x0).float())


@contextlib.contextmanager
def frozen(module):
    """Within the block no parameter of `module` requires grad (no gradient is ever allocated for a base
    weight, and backward never reaches fp8 or quantised weights); the caller's flags come back after."""
    thawed = [p for p in module.parameters() if p.requires_grad]
    for p in thawed:
        p.requires_grad_(False)
    try:
        yield len(thawed)
    finally:
        for p in thawed:
            p.requires_grad_(True)


def lora_pair_params(down_shape, up_shape, rank, dtype=torch.float32, device="cpu", generator=None):
    """A new trainable (down, up): gaussian down with std 1/rank, zero up, so training starts from the base model."""
    down = torch.randn(down_shape, generator=generator, dtype=torch.float32) / rank
    up = torch.zeros(up_shape, dtype=torch.float32)
    return (torch.nn.Parameter(down.to(device=device, dtype=dtype)),
            torch.nn.Parameter(up.to(device=device, dtype=dtype)))


def train_lora(velocity, params, x0, sigmas, settings, on_step=None, phase="lora", loss=None):
    """Train `params` for settings.steps AdamW steps, each at one sigma drawn uniformly from `sigmas`.

    `velocity(xt, sigma, dropped)` runs the model with the LoRA active (`dropped`: use the empty prompt);
    `on_step(i, loss)` is called after every step (it may raise to stop). Returns the per-step losses.
    The objective is the paper's flow-matching loss on x0 with fresh noise, unless the caller supplies
    `loss(model, x0, noise, sigma, k)` (k: the index into `sigmas` drawn this step), e.g. a teacher's trajectory.
    """
    if not sigmas:
        raise TrainingError(f"{phase}: no sigmas to train at")
    loss_fn = loss or (lambda model, x0, noise, sigma, k: flow_matching_loss(model, x0, noise, sigma))
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.lr_decay not in ("constant", "cosine"):
        raise TrainingError(f"{phase}: lr_decay {settings.lr_decay!r} is not 'constant' or 'cosine'")
    decay = None if settings.lr_decay == "constant" else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, settings.steps) / settings.steps)))
    sig = torch.tensor(sigmas, dtype=torch.float32)
    for i in range(settings.steps):
        k = torch.randint(len(sig), (1,), generator=gen)
        sigma = sig[k].to(x0.device)
        noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(x0)
        dropped = bool(torch.rand((), generator=gen) < settings.caption_dropout)
        model = lambda xt, s: velocity(xt, s, dropped)  # noqa: E731
        value_t = loss_fn(model, x0, noise, sigma, int(k))
        value = value_t.item()
        if not math.isfinite(value):
            # The inputs (image, prompt, settings) were checked finite before training, so the run diverged.
            raise TrainingError(f"{phase}: the loss became {value} at step {i + 1} of {settings.steps} (sigma "
                                f"{sigma.item():.4f}); nothing was saved. The image, prompt and settings were "
                                f"finite, so training diverged: lower the learning rate ({settings.lr:g}) or train in "
                                "float32/bfloat16 rather than float16")
        opt.zero_grad(set_to_none=True)
        value_t.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        opt.step()
        if decay is not None:
            decay.step()
        settings.losses.append(value)
        if on_step is not None:
            on_step(i, value)
    return settings.losses
