"""Phase-aware integrators over a Glance schedule, k-diffusion style.

`model(x, sigma, **extra_args)` returns the denoised estimate (x0) for a batch of sigmas, as in
k-diffusion and ComfyUI; which adapter it uses is the model's business (it switches on sigma).
"""
import torch


@torch.no_grad()
def sample_glance_euler(model, x, steps, extra_args=None, callback=None):
    """Euler over Glance steps: velocity at step.sigma, move from step.sigma_from to step.sigma_to (sigmas)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i, st in enumerate(steps):
        denoised = model(x, st.sigma * s_in, **extra_args)
        # Flow models: x = (1-s)*x0 + s*noise, so v = noise - x0 = (x - x0) / s at the conditioning sigma.
        v = (x - denoised) / st.sigma
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
