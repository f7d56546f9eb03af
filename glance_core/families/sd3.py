"""SD3 / SD3.5: static shift 3.0 on the scheduler's grid, classic CFG, unpacked latents, timestep = 1000 sigma."""
import re

import torch

from .base import Family


class SD3(Family):
    """StableDiffusion3Pipeline: CLIP-L/G + T5 text, pooled projections; the transformer patchifies itself."""

    def setup(self, pipe, *, prompt, negative_prompt, height, width, guidance, generator, n, embeds, device):
        use_cfg = guidance > 1
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=n,
            do_classifier_free_guidance=use_cfg, negative_prompt=negative_prompt,
            prompt_embeds=embeds.get("prompt_embeds"), negative_prompt_embeds=embeds.get("negative_prompt_embeds"),
            pooled_prompt_embeds=embeds.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=embeds.get("negative_pooled_prompt_embeds"))
        latents = pipe.prepare_latents(pe.shape[0], pipe.transformer.config.in_channels, height, width, pe.dtype,
                                       device, generator)

        def call(x, sigma):
            t = 1000 * sigma  # SD3's transformer takes the 0..1000 timestep
            if not use_cfg:
                return pipe.transformer(hidden_states=x, timestep=t, encoder_hidden_states=pe,
                                        pooled_projections=pooled, return_dict=False)[0]
            both = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=torch.cat([t, t]),
                                    encoder_hidden_states=torch.cat([npe, pe]),
                                    pooled_projections=torch.cat([npooled, pooled]), return_dict=False)[0]
            neg, pos = both.chunk(2)
            return neg + guidance * (pos - neg)
        return call, latents

    def train_conditioning(self, pipe, text, embeds, device):
        pe, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=device,
                                              do_classifier_free_guidance=False,
                                              prompt_embeds=embeds.get("prompt_embeds"),
                                              pooled_prompt_embeds=embeds.get("pooled_prompt_embeds"))
        return pe, pooled

    def train_call(self, pipe, height, width, device, dtype):
        def call(xt, sigma, cond):
            pe, pooled = cond
            return pipe.transformer(hidden_states=xt, timestep=1000 * sigma, encoder_hidden_states=pe,
                                    pooled_projections=pooled, return_dict=False)[0]
        return call


FAMILY = SD3(
    "sd3", "SD3 / SD3.5", shift_mode="static", shift=3.0, grid="scheduler",
    aliases=("sd3.5", "sd35", "sd3.5-large", "sd3.5-medium"),
    target_pattern=re.compile(r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"),
    markers=("joint_blocks",), comfy_config="SD3", pipeline="StableDiffusion3Pipeline")
