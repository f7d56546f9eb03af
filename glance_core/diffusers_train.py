"""One-image Glance training on a diffusers pipeline: the same loss and step as the ComfyUI node
(`glance_core.train`), with the pair as two peft adapters on the pipeline's one transformer."""
import hashlib
import logging
import os

import numpy as np
import torch

from . import __version__
from .diffusers_glance import ADAPTERS, _family
from .errors import GlanceError
from .lora import GlanceMeta, save_lora
from .schedule import build_schedule
from .train import RECIPES, TARGET_PATTERNS, TrainConfig, train_lora


def encode_image(pipe, image, family):
    """Normalised VAE latent of a [1, 3, H, W] image in [0, 1], unpacked (Qwen: [1, C, 1, h, w])."""
    vae = pipe.vae
    x = (image * 2 - 1).to(vae.device, vae.dtype)
    if family == "qwen-image":
        lat = vae.encode(x[:, :, None]).latent_dist.mode()
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(lat)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(lat)
        return (lat - mean) / std
    lat = vae.encode(x).latent_dist.mode()
    return (lat - vae.config.shift_factor) * vae.config.scaling_factor


def _pack(pipe, family, lat):
    if family == "qwen-image":
        b, c, _, h, w = lat.shape
        return pipe._pack_latents(lat[:, :, 0], b, c, h, w)
    b, c, h, w = lat.shape
    return pipe._pack_latents(lat, b, c, h, w)


def _adapter_tensors(transformer, adapter):
    """{module name: (down, up)} of one peft adapter."""
    from peft.tuners.lora import LoraLayer
    return {name: (m.lora_A[adapter].weight, m.lora_B[adapter].weight) for name, m in transformer.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def train_pair(pipe, *, image=None, image_latents=None, prompt=None, prompt_embeds=None, prompt_embeds_mask=None,
               pooled_prompt_embeds=None, empty_prompt_embeds=None, empty_prompt_embeds_mask=None,
               empty_pooled_prompt_embeds=None, steps=60, rank=None, alpha=None, learning_rate=None,
               caption_dropout=None, seed=0, phases=("slow", "fast"), out_dir=None, name=None, overwrite=False,
               on_step=None):
    """Train the Glance pair on one image; returns {phase: path} (or {phase: modules} without out_dir).

    `image`: a [1, 3, H, W] tensor in [0, 1], sides multiples of 16 (or give `image_latents`, normalised and
    unpacked). The trained adapters stay loaded as glance_slow / glance_fast, ready for `generate`.
    """
    from peft import LoraConfig
    family = _family(pipe)
    transformer = pipe.transformer
    recipe = RECIPES.get(family, RECIPES["default"])
    rank = rank or recipe["rank"]
    alpha = alpha or 4.0 * rank
    lr = learning_rate or recipe["lr"]
    dropout = recipe["caption_dropout"] if caption_dropout is None else caption_dropout
    if dropout > 0 and empty_prompt_embeds is None and prompt_embeds is not None:
        logging.getLogger("glance").warning("caption dropout %.2f is off: prompt_embeds were given without "
                                            "empty_prompt_embeds, and there is no text to encode the empty prompt "
                                            "from", dropout)
        dropout = 0.0
    paths = {}
    if out_dir is not None:
        if not name or any(c in name for c in "/\\:"):
            raise GlanceError(f"name: {name!r} must be a plain file name")
        paths = {p: os.path.join(out_dir, f"{name}_{p}.safetensors") for p in phases}
        taken = [p for p in paths.values() if os.path.exists(p)]
        if taken and not overwrite:
            raise GlanceError(f"{', '.join(taken)} exists; choose another name or pass overwrite")

    if image_latents is None:
        if image is None:
            raise GlanceError("give image (or image_latents)")
        h, w = image.shape[-2:]
        if min(h, w) < 256 or h % 16 or w % 16:
            raise GlanceError(f"image: {w}x{h} px; need at least 256 px a side, multiples of 16")
        with torch.no_grad():
            image_latents = encode_image(pipe, image, family)
    h, w = (s * 8 for s in image_latents.shape[-2:])
    sched = build_schedule(family, w, h)
    x0 = _pack(pipe, family, image_latents.float()).to(transformer.device)
    device = transformer.device

    def embeds(text, pe, pm, pooled):
        if family == "qwen-image":
            pe, pm = pipe.encode_prompt(prompt=text, device=device, prompt_embeds=pe, prompt_embeds_mask=pm)
            return pe, pm, None
        pe, pooled, ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=device, prompt_embeds=pe,
                                             pooled_prompt_embeds=pooled)
        return pe, ids, pooled
    with torch.no_grad():  # encoded once; the text encoders are not trained
        cond = embeds(prompt, prompt_embeds, prompt_embeds_mask, pooled_prompt_embeds)
        empty = cond if dropout == 0 else embeds("", empty_prompt_embeds, empty_prompt_embeds_mask,
                                                 empty_pooled_prompt_embeds)
    img_ids = None
    if family != "qwen-image":
        img_ids = pipe._prepare_latent_image_ids(1, h // 16, w // 16, device, x0.dtype)

    def velocity(xt, sigma, dropped):
        pe, extra, pooled = empty if dropped else cond
        t = sigma.to(xt.dtype).expand(xt.shape[0])
        if family == "qwen-image":
            return transformer(hidden_states=xt, timestep=t, encoder_hidden_states=pe, encoder_hidden_states_mask=extra,
                               img_shapes=[[(1, h // 16, w // 16)]], return_dict=False)[0]
        guidance = torch.ones_like(t) if transformer.config.guidance_embeds else None  # official: guidance 1.0
        return transformer(hidden_states=xt, timestep=t, guidance=guidance, pooled_projections=pooled,
                           encoder_hidden_states=pe, txt_ids=extra, img_ids=img_ids, return_dict=False)[0]

    pattern = TARGET_PATTERNS[family]
    targets = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n))
    transformer.requires_grad_(False)
    losses, trained = {}, {}
    for k, phase in enumerate(phases):
        adapter = ADAPTERS[phase]
        if adapter in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(adapter)
        torch.manual_seed(seed + k)  # peft's gaussian init draws from the global generator
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=targets), adapter_name=adapter)
        transformer.set_adapters([adapter])
        params = [t for pair in _adapter_tensors(transformer, adapter).values() for t in pair]
        for p in params:
            p.requires_grad_(True)
        cfg = TrainConfig(steps=steps, lr=lr, weight_decay=recipe["weight_decay"], caption_dropout=dropout,
                          seed=seed + 1000 * (k + 1))
        with torch.enable_grad():
            losses[phase] = train_lora(velocity, params, x0, sched.phase_sigmas(phase), cfg,
                                       on_step=(lambda i, loss, phase=phase: on_step(phase, i, loss))
                                       if on_step else None,
                                       phase=f"{phase} LoRA")
        for p in params:
            p.requires_grad_(False)
        trained[phase] = {n: (d.detach().cpu(), u.detach().cpu(), alpha)
                          for n, (d, u) in _adapter_tensors(transformer, adapter).items()}

    if not paths:
        return trained
    digest = hashlib.sha256(np.ascontiguousarray(image_latents.float().cpu().numpy()).tobytes()).hexdigest()
    written = []
    try:
        for phase in phases:
            meta = GlanceMeta(phase=phase, family=family, sigmas=sched.phase_sigmas(phase), rank=rank,
                              alpha=float(alpha), target_modules=targets, schedule=sched.to_dict(),
                              image_sha256=digest, pack_version=__version__,
                              extra={"steps": steps, "learning_rate": lr, "caption_dropout": dropout, "seed": seed,
                                     "trainer": "diffusers", "hash_of": "normalised latent",
                                     "final_loss": losses[phase][-1], "losses": losses[phase]})
            written.append(save_lora(paths[phase], trained[phase], meta.to_header(), namespace="diffusers",
                                     overwrite=overwrite))
    except BaseException:
        for p in written:
            os.unlink(p)
        raise
    return paths
