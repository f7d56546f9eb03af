"""One-image Glance training on a diffusers pipeline: the same loss, step and training plan as the ComfyUI
node (`glance_core.train`, `glance_core.plan`), with the pair as two peft adapters on the pipeline's one
transformer. What differs per family (encoding, packing, the transformer call) comes from its family module."""
import hashlib
import logging

import numpy as np
import torch

from . import distill
from .diffusers_glance import ADAPTERS, _family
from .errors import GlanceError
from .families import RECIPE_LAYERS
from .plan import (HASH_OF, PairOutput, check_finite, check_seed, image_sha256, init_seed, pair_meta, phase_seed,
                   resolve_recipe)
from .schedule import build_schedule
from .train import TrainConfig, train_lora

log = logging.getLogger("glance")
MIN_SIDE = 256


def encode_image(pipe, image, family):
    """Normalised VAE latent of a [1, 3, H, W] image in [0, 1], unpacked (Qwen: [1, C, 1, h, w])."""
    from .families import get_family
    return get_family(family).encode_image(pipe, image)


def _adapter_tensors(transformer, adapter):
    """{module name: (down, up)} of one peft adapter."""
    from peft.tuners.lora import LoraLayer
    return {name: (m.lora_A[adapter].weight, m.lora_B[adapter].weight) for name, m in transformer.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def _prepare(pipe, family, image, image_latents, phases, out_dir, name, overwrite, seed, embeds):
    """Everything checked before the first step: settings, outputs, image; returns (output, latents, sha, of)."""
    check_seed(seed)
    output = None
    if out_dir is not None:
        output = PairOutput(out_dir, name, phases, overwrite, input_name="name", folder_name="out_dir",
                            overwrite_hint="pass overwrite=True").check()
    for key, t in embeds.items():
        check_finite(t, key)
    if image_latents is None:
        if image is None:
            raise GlanceError("give image (or image_latents)")
        h, w = image.shape[-2:]
        m = family.pixel_multiple
        if min(h, w) < MIN_SIDE or h % m or w % m:
            raise GlanceError(f"image: {w}x{h} px; need at least {MIN_SIDE} px a side, multiples of {m}")
        check_finite(image, "image")
        with torch.no_grad():
            image_latents = family.encode_image(pipe, image)
        check_finite(image_latents, "image (after VAE encoding)")
        return output, image_latents, image_sha256(image[0].movedim(0, -1).clamp(0, 1)), HASH_OF
    check_finite(image_latents, "image_latents")
    # No pixels to hash: the latent's float32 bytes, and the metadata says so.
    raw = np.ascontiguousarray(image_latents.detach().float().cpu().numpy()).tobytes()
    return output, image_latents, hashlib.sha256(raw).hexdigest(), "normalised latent (float32)"


def train_pair(pipe, *, image=None, image_latents=None, prompt=None, prompt_embeds=None, prompt_embeds_mask=None,
               pooled_prompt_embeds=None, empty_prompt_embeds=None, empty_prompt_embeds_mask=None,
               empty_pooled_prompt_embeds=None, steps=60, rank=None, alpha=None, learning_rate=None,
               caption_dropout=None, seed=0, phases=("slow", "fast"), out_dir=None, name=None, overwrite=False,
               on_step=None, objective=distill.FLOW, trajectories=8, distill_cfg=1.0, student_cfg=None,
               on_trajectory=None, layers=RECIPE_LAYERS, trajectory_prompts=distill.CAPTION):
    """Train the Glance pair on one image; returns {phase: path} (or {phase: modules} without out_dir).

    `image`: a [1, 3, H, W] tensor in [0, 1], sides multiples of the family's pixel multiple (or give
    `image_latents`, normalised and unpacked). The trained adapters stay loaded as glance_slow / glance_fast,
    ready for `generate`. Settings, outputs and inputs are all checked before the first step.
    `objective=distill.DISTILL` trains on `trajectories` base-model paths (seeds seed, seed+1, ...) made at
    `distill_cfg` (the image then only gives the size); the pair is trained for sampling at `student_cfg`
    (None: distill_cfg); `trajectory_prompts=distill.MIX` makes every second path on the empty prompt.
    `on_trajectory(done, total)` counts their base-model steps. `layers`: which layers the pair adapts
    (glance_core.families.LAYERS: the family's recipe, or the timestep embedder only).
    """
    from peft import LoraConfig
    family = _family(pipe)
    transformer = pipe.transformer
    rec = resolve_recipe(family, rank, alpha, learning_rate, caption_dropout,
                         names={"lr": "learning_rate"})
    embeds = dict(prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                  pooled_prompt_embeds=pooled_prompt_embeds)
    empty_embeds = dict(prompt_embeds=empty_prompt_embeds, prompt_embeds_mask=empty_prompt_embeds_mask,
                        pooled_prompt_embeds=empty_pooled_prompt_embeds)
    student = distill.check_settings(objective, trajectories, distill_cfg, student_cfg,
                                     names={"cfg": "distill_cfg"}, prompts=trajectory_prompts)
    pattern = family.layer_pattern(layers)
    guided = student is not None and (max(distill_cfg, student) != 1 or trajectory_prompts == distill.MIX)
    if guided and empty_prompt_embeds is None and prompt_embeds is not None:
        raise GlanceError("empty_prompt_embeds: distill_cfg/student_cfg above 1 or trajectory_prompts "
                          f"{distill.MIX!r} needs the empty prompt's embeddings (the unconditional half of guidance)")
    dropout = rec.caption_dropout
    if dropout > 0 and empty_prompt_embeds is None and prompt_embeds is not None:
        log.warning("caption dropout %.2f is off: prompt_embeds were given without empty_prompt_embeds, and there "
                    "is no text to encode the empty prompt from", dropout)
        dropout = 0.0
    output, image_latents, digest, hash_of = _prepare(
        pipe, family, image, image_latents, phases, out_dir, name, overwrite, seed,
        {**embeds, **{"empty_" + k: v for k, v in empty_embeds.items()}})

    h, w = (s * family.vae_factor for s in image_latents.shape[-2:])
    sched = build_schedule(family, w, h)
    device = transformer.device
    x0 = family.pack(pipe, image_latents.float()).to(device)
    with torch.no_grad():  # encoded once; the text encoders are not trained
        cond = family.train_conditioning(pipe, prompt, embeds, device)
        empty = cond if dropout == 0 and not guided else family.train_conditioning(pipe, "", empty_embeds, device)
    call = family.train_call(pipe, h, w, device, x0.dtype)

    def velocity(xt, sigma, dropped):
        return call(xt, sigma.to(xt.dtype).expand(xt.shape[0]), empty if dropped else cond)

    targets = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n))
    if not targets:
        raise GlanceError(f"layers: found no {layers} layers of {family.label} in this {type(transformer).__name__}")
    transformer.requires_grad_(False)
    seeds, paths = [], None
    if student is not None:
        for adapter in ADAPTERS.values():  # the base model's own path: no old Glance adapter in it
            if adapter in getattr(transformer, "peft_config", {}):
                transformer.delete_adapters(adapter)
        others = bool(getattr(transformer, "peft_config", {}))
        if others:
            transformer.disable_adapters()
        seeds = distill.trajectory_seeds(seed, trajectories)
        base = list(sched.base_sigmas or family.base_sigmas(sched.base_steps, w, h))
        try:
            paths = distill.make_trajectories(velocity, tuple(x0.shape), seeds, base, sched.steps, distill_cfg,
                                              on_step=on_trajectory, device=device, prompts=trajectory_prompts)
        finally:
            if others:
                transformer.enable_adapters()
    losses, trained = {}, {}
    for k, phase in enumerate(phases):
        adapter = ADAPTERS[phase]
        if adapter in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters(adapter)
        torch.manual_seed(init_seed(seed, k))  # peft's gaussian init draws from the global generator
        transformer.add_adapter(LoraConfig(r=rec.rank, lora_alpha=rec.alpha, init_lora_weights="gaussian",
                                           target_modules=targets), adapter_name=adapter)
        transformer.set_adapters([adapter])
        params = [t for pair in _adapter_tensors(transformer, adapter).values() for t in pair]
        for p in params:
            p.requires_grad_(True)
        settings = TrainConfig(steps=steps, lr=rec.lr, weight_decay=rec.weight_decay, caption_dropout=dropout,
                               seed=phase_seed(seed, k), lr_decay=distill.lr_decay(objective))
        loss = None if paths is None else distill.distill_loss(paths, sched.steps, phase, velocity, student,
                                                                 seed=phase_seed(seed, k))
        with torch.enable_grad():
            losses[phase] = train_lora(velocity, params, x0, sched.phase_sigmas(phase), settings,
                                       on_step=(lambda i, loss, phase=phase: on_step(phase, i, loss))
                                       if on_step else None,
                                       phase=f"{phase} LoRA", loss=loss)
        for p in params:
            p.requires_grad_(False)
        trained[phase] = {n: (d.detach().cpu(), u.detach().cpu(), rec.alpha)
                          for n, (d, u) in _adapter_tensors(transformer, adapter).items()}

    if output is None:
        return trained
    metas = {phase: pair_meta(phase, family.name, sched, rec, targets, digest, losses[phase],
                              {"steps": steps, "caption_dropout": dropout, "seed": seed, "trainer": "diffusers",
                               "hash_of": hash_of, "layers": layers,
                               **distill.meta(objective, seeds, distill_cfg, student, sched.base_steps,
                                              trajectory_prompts)})
             for phase in phases}
    output.write(trained, metas, "diffusers")
    return output.paths
