"""GlanceSampler: the phase-aware KSampler. One node, one sampling pass, the whole 10-step result."""
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.v0_0_2 import io

from ..glance_core.errors import GlanceError
from ..glance_core.families import comfyui_families
from ..glance_core.integrate import sample_glance_euler
from ..glance_core.schedule import MODES
from .pair import BOUNDARY_OPTION
from .schedule_node import AUTO, schedule_for, step_inputs


def sample_reference_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, glance_steps=()):
    """KSAMPLER function for `reference` mode: Euler with separate conditioning and integration sigmas."""
    if len(sigmas) != len(glance_steps) + 1:
        raise GlanceError("reference mode got sigmas that do not belong to its schedule")
    return sample_glance_euler(model, x, glance_steps, extra_args, callback)


def interruptible(callback):
    """Wrap a progress/preview callback so that every step also honours ComfyUI's cancel button."""
    def cb(step, x0, x, total_steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        callback(step, x0, x, total_steps)
    return cb


class GlanceSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GlanceSampler",
            display_name="Glance Sampler",
            category="sampling/glance",
            description="Sample a model that carries a Glance LoRA pair in 10 steps (by default): the Slow LoRA "
                        "for the early steps, the Fast LoRA for the late ones, in one sampling pass. Without a "
                        "pair it samples the plain Glance schedule (useful for comparison).",
            inputs=[
                io.Model.Input("model", tooltip="A model from Glance LoRA Pair Loader (or any flow-matching model)."),
                io.Conditioning.Input("positive", tooltip="What the image should show."),
                io.Conditioning.Input("negative", tooltip="What to steer away from (used when cfg > 1)."),
                io.Latent.Input("latent_image", tooltip="The latent to sample; its size sets the schedule."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the initial noise."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance. The official Qwen-Image recipe uses 5 (add "
                                       "CFGNorm for its norm rescale); guidance-distilled FLUX.1-dev uses 1.0 "
                                       "with FluxGuidance."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Any ComfyUI sampler for consistent mode; reference mode is Euler only."),
                io.Combo.Input("mode", options=list(MODES), default=MODES[0],
                               tooltip="consistent: each step moves between the listed sigmas. reference: what "
                                       "the official Qwen pipeline integrates (slow stage on the 50-step grid, "
                                       "fast stage restarting at sigma 1), for comparison."),
                io.Combo.Input("family", options=[AUTO, *[f for f in comfyui_families() if f != "explicit"]],
                               default=AUTO,
                               tooltip="Schedule preset. auto: from the pair's metadata, else from the model."),
                *step_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The sampled latent; decode it with VAE Decode.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, cfg, sampler_name, mode, family, base_steps,
                slow_steps, slow_stride, fast_steps) -> io.NodeOutput:
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        steps = dict(base_steps=base_steps, slow_steps=slow_steps, slow_stride=slow_stride, fast_steps=fast_steps)
        sched = schedule_for(model, family, {"samples": latent}, 0, 0, None, steps, mode, "latent_image")
        sigmas = torch.tensor(sched.sigmas, dtype=torch.float32)
        if mode == "reference":
            if sampler_name != "euler":
                raise GlanceError(f"sampler_name: reference mode reproduces the official Euler loop; choose "
                                  f"euler (got {sampler_name}) or switch mode to consistent")
            sampler = comfy.samplers.KSAMPLER(sample_reference_euler, extra_options={"glance_steps": sched.steps})
        else:
            sampler = comfy.samplers.sampler_object(sampler_name)
        m = model.clone()  # shares weights and patches_uuid: no reload
        m.model_options.setdefault("transformer_options", {})[BOUNDARY_OPTION] = sched.boundary

        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        x0 = {}
        callback = interruptible(latent_preview.prepare_callback(m, len(sigmas) - 1, x0))
        samples = comfy.sample.sample_custom(m, noise, cfg, sampler, sigmas, positive, negative, latent,
                                             noise_mask=latent_image.get("noise_mask"), callback=callback,
                                             disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = latent_image.copy()
        out["samples"] = samples
        return io.NodeOutput(out)
