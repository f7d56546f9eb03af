"""Phase-aware integrators over a Glance schedule, k-diffusion style.

`model(x, sigma, **extra_args)` returns the denoised estimate (x0) for a batch of sigmas, as in
k-diffusion and ComfyUI; which adapter it uses is the model's business (it switches on sigma).
"""
import torch


def _per_sample(sigma, like):
    """sigma (a number or one per batch entry) shaped to broadcast over a [B, ...] tensor."""
    if not torch.is_tensor(sigma):
        return sigma
    return sigma.reshape(-1, *([1] * (like.dim() - 1)))


def velocity_from_denoised(x, denoised, sigma):
    """Flow models: x = (1 - sigma) x0 + sigma noise, so v = noise - x0 = (x - x0) / sigma (sigma > 0)."""
    return (x - denoised) / _per_sample(sigma, x)


def denoised_from_velocity(x, velocity, sigma):
    """The inverse: x0 = x - sigma v."""
    return x - _per_sample(sigma, x) * velocity


@torch.no_grad()
def sample_glance_euler(model, x, steps, extra_args=None, callback=None):
    """Euler over Glance steps: velocity at step.sigma, move from step.sigma_from to step.sigma_to (sigmas)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i, st in enumerate(steps):
        denoised = model(x, st.sigma * s_in, **extra_args)
        v = velocity_from_denoised(x, denoised, st.sigma)  # at the conditioning sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": st.sigma, "sigma_hat": st.sigma, "denoised": denoised,
                      "phase": st.phase})
        x = x + (st.sigma_to - st.sigma_from) * v
    return x


@torch.no_grad()
def sample_glance_velocity(velocity, x, steps, callback=None):
    """Euler with a model that returns velocity: x += (step.sigma_to - step.sigma_from) * velocity(x, step)."""
    for i, st in enumerate(steps):
        v = velocity(x, st)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": st.sigma, "phase": st.phase, "velocity": v})
        x = (x.float() + (st.sigma_to - st.sigma_from) * v.float()).to(x.dtype)
    return x
