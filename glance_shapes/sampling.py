"""Sampling the teacher with the phase-aware integrator the ComfyUI sampler node uses (glance_core.integrate),
optionally with a Glance pair switched per model call by sigma."""
import torch

from glance_core import runtime
from glance_core.integrate import denoised_from_velocity, sample_glance_euler
from glance_core.schedule import Step, build_schedule, phase_at
from .data import SIZE
from .family import FAMILY


def plain_steps(n):
    """The teacher's plain n-step Euler schedule (the family grid, then sigma 0) as integrator steps."""
    grid = FAMILY.base_sigmas(n, SIZE, SIZE) + [0.0]
    return tuple(Step("plain", s, s, t) for s, t in zip(grid, grid[1:]))


def glance_schedule(mode="consistent", **steps):
    """The Glance schedule of the teacher (50-step base grid compressed to 5 slow + 5 fast by default)."""
    return build_schedule(FAMILY, SIZE, SIZE, mode=mode, **steps)


def noise_for(seeds):
    """Starting noise [B, 3, 32, 32], one generator per seed, so an image depends only on its own seed."""
    return torch.stack([torch.randn(3, SIZE, SIZE, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def denoiser(teacher, cond, adapters=None, boundary=None, cfg=1.0):
    """model(x, sigma) -> denoised x0 for the integrator; with adapters {"slow": A, "fast": B} (either may be
    None) the slow one runs above `boundary` (a sigma) and the fast one at or below it, in both CFG passes."""
    def model(x, sigma):
        adapter = None
        if adapters:
            adapter = adapters.get(phase_at(float(sigma[0]), boundary))
        with runtime.active(adapter, replace=True):
            v = teacher.guided_velocity(x, sigma, cond, cfg)
        return denoised_from_velocity(x, v, sigma)
    return model


@torch.no_grad()
def sample(teacher, captions, seeds, steps, adapters=None, boundary=None, cfg=1.0, callback=None):
    """Pictures [B, 3, 32, 32] in [0, 1] for captions and seeds along integrator `steps` (cfg 1: no guidance)."""
    x = noise_for(seeds)
    model = denoiser(teacher, teacher.cond(captions), adapters, boundary, cfg)
    x = sample_glance_euler(model, x, steps, callback=callback)
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def trajectory(teacher, caption, seed, n=50, cfg=1.0):
    """The teacher's plain n-step Euler path for one caption and seed: {sigma: x_sigma [1, 3, 32, 32]} (+ 0.0)."""
    path = {}
    model = denoiser(teacher, teacher.cond([caption]), cfg=cfg)
    x = sample_glance_euler(model, noise_for([seed]), plain_steps(n),
                            callback=lambda info: path.__setitem__(info["sigma"], info["x"]))
    path[0.0] = x
    return path
