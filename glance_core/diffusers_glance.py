"""Glance on diffusers pipelines: both LoRAs as two peft adapters in the ONE transformer, switched per step.

Supports QwenImagePipeline (true CFG with the per-token norm rescale), FluxPipeline (guidance embedding) and
StableDiffusion3Pipeline (classic CFG). Sigmas are in [0, 1]; the Qwen-Image and FLUX transformers take
timestep = sigma, SD3's takes timestep = 1000 * sigma.
"""
import torch

from .errors import GlanceError, LoraMismatchError
from .integrate import sample_glance_velocity
from .lora import check_matches, read_lora
from .lora.reader import OFFICIAL_ATTN
from .schedule import build_schedule

ADAPTERS = {"slow": "glance_slow", "fast": "glance_fast"}
AS_OFFICIAL = "as the official pipeline"
POLICIES = ("as trained", "as stored", AS_OFFICIAL)
PIPELINE_FAMILIES = {"QwenImagePipeline": "qwen-image", "FluxPipeline": "flux.1-dev",
                     "StableDiffusion3Pipeline": "sd3"}


def peft_state_dict(lora, policy="as trained"):
    """{transformer.<module>.lora_A/B.weight} for diffusers, each LoRA's scale folded into B.

    AS_OFFICIAL reproduces what stock `load_lora_weights` does to the official Glance files: the attention
    modules written with '.lora.down/.lora.up' names are dropped and the rest applied at scale 1.0.
    """
    if lora.namespace == "comfyui" and lora.family == "flux.1-dev":
        raise GlanceError(f"{lora.path}: FLUX LoRAs in ComfyUI's fused naming (double_blocks...) need conversion; "
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
    transformer = pipe.transformer
    names = {n for n, _ in transformer.named_modules()}
    label = f"this {type(transformer).__name__}"
    lines = []
    for phase, src in (("slow", slow), ("fast", fast)):
        lora = src if hasattr(src, "modules") else read_lora(src, "as stored" if scale_policy == AS_OFFICIAL
                                                             else scale_policy)
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
    fam = PIPELINE_FAMILIES.get(type(pipe).__name__)
    if fam is None:
        raise GlanceError(f"{type(pipe).__name__} is not supported; use one of {', '.join(PIPELINE_FAMILIES)}")
    return fam


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
    if family == "qwen-image":
        call, latents = _qwen_setup(pipe, prompt, negative_prompt, height, width, true_cfg_scale, generator,
                                    num_images_per_prompt, prompt_embeds, prompt_embeds_mask, negative_prompt_embeds,
                                    negative_prompt_embeds_mask, device)
    elif family == "sd3":
        call, latents = _sd3_setup(pipe, prompt, negative_prompt, height, width, guidance_scale, generator,
                                   num_images_per_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                   negative_pooled_prompt_embeds, device)
    else:
        call, latents = _flux_setup(pipe, prompt, height, width, guidance_scale, generator, num_images_per_prompt,
                                    prompt_embeds, pooled_prompt_embeds, device)

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


def _qwen_setup(pipe, prompt, negative_prompt, height, width, cfg, generator, n, pe, pm, npe, npm, device):
    pe, pm = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=n, prompt_embeds=pe,
                                prompt_embeds_mask=pm)
    true_cfg = cfg > 1 and (negative_prompt is not None or npe is not None)
    if true_cfg:
        npe, npm = pipe.encode_prompt(prompt=negative_prompt, device=device, num_images_per_prompt=n,
                                      prompt_embeds=npe, prompt_embeds_mask=npm)
    batch = pe.shape[0]
    latents = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width, pe.dtype, device,
                                   generator)
    img_shapes = [[(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)]] * batch
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full((batch,), 1.0, device=device, dtype=torch.float32)

    def run(x, sigma, emb, mask):
        return pipe.transformer(hidden_states=x, timestep=sigma, guidance=guidance, encoder_hidden_states_mask=mask,
                                encoder_hidden_states=emb, img_shapes=img_shapes, return_dict=False)[0]

    def call(x, sigma):
        v = run(x, sigma, pe, pm)
        if not true_cfg:
            return v
        neg = run(x, sigma, npe, npm)
        comb = neg + cfg * (v - neg)
        return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    return call, latents


def _flux_setup(pipe, prompt, height, width, guidance_scale, generator, n, pe, pooled, device):
    pe, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, num_images_per_prompt=n,
                                              prompt_embeds=pe, pooled_prompt_embeds=pooled)
    batch = pe.shape[0]
    latents, image_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width,
                                              pe.dtype, device, generator)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)

    def call(x, sigma):
        return pipe.transformer(hidden_states=x, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                                encoder_hidden_states=pe, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
    return call, latents


def _sd3_setup(pipe, prompt, negative_prompt, height, width, cfg, generator, n, pe, npe, pooled, npooled, device):
    use_cfg = cfg > 1
    pe, npe, pooled, npooled = pipe.encode_prompt(
        prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=n,
        do_classifier_free_guidance=use_cfg, negative_prompt=negative_prompt, prompt_embeds=pe,
        negative_prompt_embeds=npe, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=npooled)
    latents = pipe.prepare_latents(pe.shape[0], pipe.transformer.config.in_channels, height, width, pe.dtype, device,
                                   generator)

    def call(x, sigma):
        t = 1000 * sigma  # SD3's transformer takes the 0..1000 timestep
        if not use_cfg:
            return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pooled,
                                    return_dict=False)[0]
        both = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                                encoder_hidden_states=torch.cat([npe, pe]),
                                pooled_projections=torch.cat([npooled, pooled]), return_dict=False)[0]
        neg, pos = both.chunk(2)
        return neg + cfg * (pos - neg)
    return call, latents


def _decode(pipe, family, latents, height, width, output_type):
    if output_type == "latent":
        return latents
    vae = pipe.vae
    if vae is None:
        raise GlanceError("this pipeline has no VAE: ask for output_type='latent'")
    if family != "sd3":  # SD3 latents are not packed
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents.to(vae.dtype)
    if family == "qwen-image":
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        image = vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]
    else:
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


__all__ = ["ADAPTERS", "POLICIES", "AS_OFFICIAL", "LoraMismatchError", "generate", "load_pair", "peft_state_dict"]
