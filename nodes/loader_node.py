"""GlanceLoRAPairLoader: a MODEL that carries a Slow/Fast LoRA pair and switches between them by itself."""
import logging
import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..glance_core import runtime
from ..glance_core.errors import GlanceError
from ..glance_core.lora import SCALE_POLICIES, check_pair_phases, read_lora
from .comfy_model import family_of, model_label, require_flow
from .pair import GlancePair, attach, key_map_of, pair_steps, with_pair

log = logging.getLogger("glance")


OFFICIAL_PAIR_HINT = ("the official Qwen-Image pair is glance_qwen_slow.safetensors and glance_qwen_fast.safetensors "
                      "from the Hugging Face model repository CSU-JPG/Glance; GlanceTrainLoRAPair makes a pair for "
                      "any model")


def lora_path(name, input_name):
    """Full path of a file picked from ComfyUI's loras folder; GlanceError naming the input and what to do if none."""
    folders = ", ".join(folder_paths.get_folder_paths("loras"))
    if not name:
        raise GlanceError(f"{input_name}: no LoRA file chosen. Put the pair's two .safetensors files in ComfyUI's "
                          f"loras folder ({folders}), press R in the web page to refresh the lists, then pick the "
                          f"{input_name.split('_')[0]} file here ({OFFICIAL_PAIR_HINT})")
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise GlanceError(f"{input_name}: LoRA file {name!r} not found in ComfyUI's loras folder(s): {folders}. "
                          f"Download or copy it there and press R in the web page to refresh the lists "
                          f"({OFFICIAL_PAIR_HINT})")
    return path


def read_input(name, input_name, policy):
    try:
        return read_lora(lora_path(name, input_name), policy)
    except GlanceError as e:
        msg = str(e)
        raise GlanceError(msg if msg.startswith(input_name) else f"{input_name}: {msg}") from None


def load_pair(model, slow_name, fast_name, strength_slow, strength_fast, scale_policy):
    """Read both files, check they form a pair for this model, and return (MODEL clone, report text)."""
    require_flow(model)
    slow = read_input(slow_name, "slow_lora", scale_policy)
    fast = read_input(fast_name, "fast_lora", scale_policy)
    check_pair_phases(slow, fast, ("slow_lora", "fast_lora"))
    model_family = family_of(model)
    for lora, input_name in ((slow, "slow_lora"), (fast, "fast_lora")):
        if lora.family and model_family and lora.family != model_family:
            raise GlanceError(f"{input_name}: {os.path.basename(lora.path)} is a {lora.family} LoRA but the model "
                              f"is {model_family} ({model_label(model)}): pick a pair made for this model")
    family = slow.family or fast.family or model_family
    if family is None:
        raise GlanceError(f"model: no Glance preset knows this {model_label(model)} model and the pair does not "
                          "say its family; use GlanceSchedule with family 'explicit' and a pair with metadata")
    adapters = {"slow": runtime.Adapter("slow"), "fast": runtime.Adapter("fast")}
    key_map = key_map_of(model)
    attach(model, slow, adapters["slow"], strength_slow, "slow_lora", key_map)
    attach(model, fast, adapters["fast"], strength_fast, "fast_lora", key_map)
    steps = pair_steps(slow, fast)
    lines = [f"slow: {slow.summary()}", f"fast: {fast.summary()}",
             f"schedule preset {family}, steps {steps.slow_steps}x{steps.slow_stride} slow + "
             f"{steps.fast_steps} fast of {steps.base_steps}"]
    if slow.ranks != fast.ranks:
        lines.append(f"note: slow rank {slow.ranks} differs from fast rank {fast.ranks}")
    report = "\n".join(lines)
    for line in lines:
        log.info("Glance pair %s", line)
    fixed, base = _explicit_schedule(slow, fast) if family == "explicit" else (None, None)
    pair = GlancePair(adapters["slow"], adapters["fast"], family, steps, report, fixed, base)
    return with_pair(model, pair), report


PICK_HINT = ("Empty list? Download glance_qwen_slow.safetensors and glance_qwen_fast.safetensors (Hugging Face "
             "CSU-JPG/Glance, Qwen-Image) into models/loras, or train a pair with Glance Train LoRA Pair, then press "
             "R to refresh. The official files are recognised by their tensor layout whatever they are named (and read "
             "at the scale they were trained at under 'as trained'); they do not say which is slow and which fast, "
             "so pick each here.")
def _explicit_schedule(slow, fast):
    """(boundary sigma, base sigmas or None) of a pair trained on an explicit schedule, from its metadata."""
    for lora in (slow, fast):
        sched = lora.glance.stored_schedule() if lora.glance is not None else None
        if sched is not None:
            return sched.boundary, sched.base_sigmas
    raise GlanceError("slow_lora: the pair says family 'explicit' but records no schedule; it cannot be sampled")


class GlanceLoRAPairLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        loras = folder_paths.get_filename_list("loras")
        return io.Schema(
            node_id="GlanceLoRAPairLoader",
            display_name="Glance LoRA Pair Loader",
            category="loaders/glance",
            description="Load a Glance Slow/Fast LoRA pair onto a flow-matching model. The returned model uses "
                        "the Slow LoRA for high-noise steps and the Fast LoRA for the rest, switching by itself "
                        "at the pair's boundary sigma, with any sampler. Nothing is merged into the weights, so "
                        "the switch costs no reload.",
            inputs=[
                io.Model.Input("model", tooltip="The base flow-matching model (Qwen-Image, FLUX, SD3...)."),
                io.Combo.Input("slow_lora", options=loras,
                               tooltip="The Slow LoRA (early, high-noise steps), from ComfyUI's models/loras folder. "
                                       + PICK_HINT),
                io.Combo.Input("fast_lora", options=loras,
                               tooltip="The Fast LoRA (late, detail steps), from ComfyUI's models/loras folder. "
                                       + PICK_HINT),
                io.Float.Input("strength_slow", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the Slow LoRA (1.0 = as loaded with the scale policy)."),
                io.Float.Input("strength_fast", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier of the Fast LoRA."),
                io.Combo.Input("scale_policy", options=list(SCALE_POLICIES), default=SCALE_POLICIES[0],
                               tooltip="For files that store no alpha. 'as trained': the scale they were "
                                       "trained at (4.0 for the official Glance files). 'as stored': 1.0, "
                                       "what stock LoRA loaders apply."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model carrying the pair; sample it with GlanceSampler, or any "
                                        "sampler fed with GlanceSchedule sigmas."),
                io.String.Output(display_name="report",
                                 tooltip="What was loaded: layouts, modules, ranks and the scale applied."),
            ],
        )

    @classmethod
    def validate_inputs(cls, slow_lora, fast_lora):
        # Replaces ComfyUI's bare "Value not in list" (an empty list when no LoRA is installed) with what to do.
        for name, input_name in ((slow_lora, "slow_lora"), (fast_lora, "fast_lora")):
            try:
                lora_path(name, input_name)
            except GlanceError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, model, slow_lora, fast_lora, strength_slow, strength_fast, scale_policy) -> io.NodeOutput:
        out, report = load_pair(model, slow_lora, fast_lora, strength_slow, strength_fast, scale_policy)
        return io.NodeOutput(out, report)
