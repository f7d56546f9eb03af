"""GlanceSchedule: the Glance sigma list for a model at a latent's size."""
import logging

import torch
from comfy_api.v0_0_2 import io

from ..glance_core.errors import GlanceError
from ..glance_core.families import comfyui_families, get_family
from ..glance_core.schedule import DEFAULTS, build_schedule, model_size
from .comfy_model import family_of, model_label, require_flow
from .pair import pair_of

AUTO = "auto"
log = logging.getLogger("glance")


def step_inputs():
    """The step-count widgets shared by the schedule and sampler nodes."""
    return [
        io.Int.Input("base_steps", default=DEFAULTS["base_steps"], min=2, max=1000,
                     tooltip="Steps of the base schedule that Glance compresses (the official recipe: 50)."),
        io.Int.Input("slow_steps", default=DEFAULTS["slow_steps"], min=1, max=100,
                     tooltip="Steps in the early, high-noise phase, sampled with the Slow LoRA."),
        io.Int.Input("slow_stride", default=DEFAULTS["slow_stride"], min=1, max=100,
                     tooltip="The slow phase takes every n-th step of the base schedule (official: 2)."),
        io.Int.Input("fast_steps", default=DEFAULTS["fast_steps"], min=1, max=100,
                     tooltip="Steps in the late, detail phase, sampled with the Fast LoRA; the last one is "
                             "the base schedule's final step."),
    ]


class GlanceSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GlanceSchedule",
            display_name="Glance Schedule",
            category="sampling/glance",
            description="Sigmas for Glance sampling: the base model's N-step schedule at this resolution, "
                        "compressed to a few slow steps and a few fast steps (10 of 50 by default). Feed "
                        "them to SamplerCustomAdvanced with a model that carries a Glance LoRA pair.",
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching model to sample (Qwen-Image, FLUX, SD3...)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The latent to sample; its size sets the resolution-dependent shift. "
                                        "Without it, width and height are used."),
                io.Int.Input("width", default=1024, min=16, max=16384, step=16,
                             tooltip="Image width in pixels, used when no latent is connected. Past about "
                                     "4464x4464 px (FLUX) or 11056x11056 px (Qwen-Image) the family's shift "
                                     "leaves no distinct steps, and the size is refused with the one that works."),
                io.Int.Input("height", default=1024, min=16, max=16384, step=16,
                             tooltip="Image height in pixels, used when no latent is connected."),
                io.Combo.Input("family", options=[AUTO, *comfyui_families()], default=AUTO,
                               tooltip="Schedule preset. auto: from the Glance pair's metadata, else from the "
                                       "model. explicit: compress the base_sigmas input instead of a preset's "
                                       "formula."),
                *step_inputs(),
                io.Sigmas.Input("base_sigmas", optional=True,
                                tooltip="family 'explicit' only: the base N-step schedule to compress."),
            ],
            outputs=[io.Sigmas.Output(tooltip="Conditioning sigmas of the 10 (by default) Glance steps, "
                                              "then 0.")],
        )

    @classmethod
    def execute(cls, model, width, height, family, base_steps, slow_steps, slow_stride, fast_steps,
                latent=None, base_sigmas=None) -> io.NodeOutput:
        sched = schedule_for(model, family, latent, width, height, base_sigmas,
                             dict(base_steps=base_steps, slow_steps=slow_steps, slow_stride=slow_stride,
                                  fast_steps=fast_steps))
        log.info("Glance schedule %s %dx%d: slow %s | fast %s", sched.family, sched.width, sched.height,
                 [round(s, 4) for s in sched.phase_sigmas("slow")], [round(s, 4) for s in sched.phase_sigmas("fast")])
        return io.NodeOutput(torch.tensor(sched.sigmas, dtype=torch.float32))


def schedule_for(model, family, latent, width, height, base_sigmas, steps, mode="consistent",
                 latent_input="latent"):
    """Build the glance_core schedule for a MODEL; errors name the node input at fault."""
    require_flow(model)
    pair = pair_of(model)
    if family == AUTO:
        # A pair's own preset (its metadata) wins over the model's; a pair on an explicit schedule
        # brings its recorded base sigmas.
        family = pair.family if pair is not None else family_of(model)
        if family is None:
            raise GlanceError(f"family: no Glance preset knows this {model_label(model)} model; choose a family, "
                              "or 'explicit' with base_sigmas")
    fam = get_family(family)
    if latent is not None:
        samples = latent["samples"]
        try:
            width, height = model_size(fam.name, samples.shape[-2], samples.shape[-1])
        except GlanceError as e:
            raise GlanceError(f"{latent_input}: {e}") from None
    explicit = None
    if fam.shift_mode == "explicit":
        if base_sigmas is not None:
            explicit = [float(s) for s in base_sigmas]
        elif pair is not None and getattr(pair, "base_sigmas", None) is not None:
            explicit = list(pair.base_sigmas)
        else:
            raise GlanceError("base_sigmas: family 'explicit' needs the base schedule connected (or a model "
                              "carrying a pair trained on an explicit schedule)")
    elif base_sigmas is not None:
        raise GlanceError(f"base_sigmas: only used with family 'explicit', not {fam.name}; disconnect it")
    try:
        return build_schedule(fam.name, int(width), int(height), mode, base_sigmas=explicit, **steps)
    except GlanceError as e:
        if latent is not None and "px" in str(e):
            raise GlanceError(f"{latent_input}: {e}") from None
        raise
