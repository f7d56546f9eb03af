"""Glance on diffusers pipelines: both LoRAs as two peft adapters in the ONE transformer, switched per step.

Supports every pipeline a family module declares (glance_core.families: QwenImagePipeline with true CFG and
the per-token norm rescale, FluxPipeline with its guidance embedding, StableDiffusion3Pipeline with classic
CFG); the family encodes, packs, calls and decodes. Sigmas are in [0, 1].
"""
import torch

from . import families
from .errors import GlanceError, LoraMismatchError
from .integrate import sample_glance_velocity
from .lora import check_matches, check_pair_phases, read_lora
from .lora.reader import OFFICIAL_ATTN
from .schedule import build_schedule

ADAPTERS = {"slow": "glance_slow", "fast": "glance_fast"}
AS_OFFICIAL = "as the official pipeline"
POLICIES = ("as trained", "as stored", AS_OFFICIAL)


def _known_family(name):
    """The registered Family called `name`, or None (no or unknown family)."""
    from .families import FAMILIES
    return FAMILIES.get(name)


def peft_state_dict(lora, policy="as trained"):
    """{transformer.<module>.lora_A/B.weight} for diffusers, each LoRA's scale folded into B.

    AS_OFFICIAL reproduces what stock `load_lora_weights` does to the official Glance files: the attention
    modules written with '.lora.down/.lora.up' names are dropped and the rest applied at scale 1.0.
    """
    fam = _known_family(lora.family)
    if lora.namespace == "comfyui" and fam is not None and not fam.comfyui_names_are_diffusers:
        raise GlanceError(f"{lora.path}: {fam.label} LoRAs in ComfyUI's own module naming need conversion; "
                          "train or export them in diffusers naming")
    out = {}
    for name, m in lora.modules.items():
        scale = m.scale
        if policy == AS_OFFICIAL:
            if lora.layout == "glance-official" and OFFICIAL_ATTN.search(name):
                continue
            scale = 1.0 if m.alpha is None else m.scale
        out[f"transformer.{name}.lora_A.weight"] = m.down.float()
        out[f"transformer.{name}.lora_B.weight"] = m.up.float() * scale
    return out


def load_pair(pipe, slow, fast, scale_policy="as trained"):
    """Load a Glance pair (paths or LoraFiles) as adapters glance_slow / glance_fast; returns a report string."""
    if scale_policy not in POLICIES:
        raise GlanceError(f"scale_policy must be one of {POLICIES}, got {scale_policy!r}")
    read = {phase: src if hasattr(src, "modules") else read_lora(src, "as stored" if scale_policy == AS_OFFICIAL
                                                                 else scale_policy)
            for phase, src in (("slow", slow), ("fast", fast))}
    check_pair_phases(read["slow"], read["fast"])  # the same swapped-files check as the node and the CLI
    transformer = pipe.transformer
    names = {n for n, _ in transformer.named_modules()}
    label = f"this {type(transformer).__name__}"
    lines = []
    for phase, lora in read.items():
        check_matches(lora, names, label, strict=True)
        adapter = ADAPTERS[phase]
        if adapter in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(adapter)
        transformer.load_lora_adapter(peft_state_dict(lora, scale_policy), prefix="transformer",
                                      adapter_name=adapter)
        lines.append(f"{phase}: {lora.summary()}" + (f"; {scale_policy}" if scale_policy == AS_OFFICIAL else ""))
    transformer.set_adapters([ADAPTERS["slow"]])
    return "\n".join(lines)


def _family(pipe):
    """The Family of a pipeline (GlanceError naming the supported pipelines)."""
    return families.for_pipeline(pipe)


@torch.no_grad()
def generate(pipe, prompt=None, *, negative_prompt=" ", height=1024, width=1024, mode="consistent",
             true_cfg_scale=5.0, guidance_scale=3.5, generator=None, num_images_per_prompt=1, prompt_embeds=None,
             prompt_embeds_mask=None, negative_prompt_embeds=None, negative_prompt_embeds_mask=None,
             pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, output_type="pil", progress=True,
             use_pair=True, **steps):
    """Generate with the Glance schedule, switching the pair's adapters at the boundary.

    Qwen-Image: true CFG (`true_cfg_scale` > 1 with a negative prompt) and the norm rescale, as the official
    pipeline. FLUX: `guidance_scale` feeds the guidance embedding. SD3: classic CFG at `guidance_scale`.
    `steps`: base_steps, slow_steps, slow_stride, fast_steps. Returns PIL images (output_type "pil"), arrays
    ("np") or latents ("latent"; packed for Qwen-Image and FLUX).
    """
    family = _family(pipe)
    transformer = pipe.transformer
    device = transformer.device
    sched = build_schedule(family, width, height, mode, **steps)
    has_pair = use_pair and set(ADAPTERS.values()) <= set(getattr(transformer, "peft_config", {}))
    if use_pair and not has_pair:
        raise GlanceError("no Glance pair loaded on this pipeline: call load_pair first (or use_pair=False)")

    if isinstance(prompt, list) and isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompt)  # one negative per prompt of the batch
    embeds = dict(prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                  negative_prompt_embeds=negative_prompt_embeds,
                  negative_prompt_embeds_mask=negative_prompt_embeds_mask, pooled_prompt_embeds=pooled_prompt_embeds,
                  negative_pooled_prompt_embeds=negative_pooled_prompt_embeds)
    guidance = true_cfg_scale if family.guidance_arg == "true_cfg_scale" else guidance_scale
    call, latents = family.setup(pipe, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                                 guidance=guidance, generator=generator, n=num_images_per_prompt, embeds=embeds,
                                 device=device)

    state = {"phase": None}
    bar = pipe.progress_bar(total=len(sched.steps)) if progress else None

    def velocity(x, st):
        if has_pair and st.phase != state["phase"]:
            transformer.set_adapters([ADAPTERS[st.phase]])
            state["phase"] = st.phase
        return call(x, torch.full((x.shape[0],), st.sigma, device=device, dtype=x.dtype))

    try:
        if not has_pair and getattr(transformer, "peft_config", None):
            transformer.disable_adapters()
        latents = sample_glance_velocity(velocity, latents, sched.steps,
                                         callback=(lambda d: bar.update()) if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
        if not has_pair and getattr(transformer, "peft_config", None):
            transformer.enable_adapters()
    return _decode(pipe, family, latents, height, width, output_type)


def _decode(pipe, family, latents, height, width, output_type):
    if output_type == "latent":
        return latents
    if pipe.vae is None:
        raise GlanceError("this pipeline has no VAE: ask for output_type='latent'")
    image = family.decode(pipe, latents, height, width)
    return pipe.image_processor.postprocess(image, output_type=output_type)


__all__ = ["ADAPTERS", "POLICIES", "AS_OFFICIAL", "LoraMismatchError", "generate", "load_pair", "peft_state_dict"]
