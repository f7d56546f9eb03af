"""FLUX.1-dev: dynamic shift up to 4096 tokens, a guidance embedding instead of CFG, packed 2x2 latents."""
import re

import torch

from .base import Family


class Flux(Family):
    """FluxPipeline: CLIP pooled + T5 text, positional ids for text and image tokens."""

    def setup(self, pipe, *, prompt, negative_prompt, height, width, guidance, generator, n, embeds, device):
        pe, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                  num_images_per_prompt=n, prompt_embeds=embeds.get("prompt_embeds"),
                                                  pooled_prompt_embeds=embeds.get("pooled_prompt_embeds"))
        batch = pe.shape[0]
        latents, image_ids = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width,
                                                  pe.dtype, device, generator)
        g = None
        if pipe.transformer.config.guidance_embeds:
            g = torch.full((batch,), guidance, device=device, dtype=torch.float32)

        def call(x, sigma):
            return pipe.transformer(hidden_states=x, timestep=sigma, guidance=g, pooled_projections=pooled,
                                    encoder_hidden_states=pe, txt_ids=text_ids, img_ids=image_ids,
                                    return_dict=False)[0]
        return call, latents

    def pack(self, pipe, lat):
        b, c, h, w = lat.shape
        return pipe._pack_latents(lat, b, c, h, w)

    def decode(self, pipe, latents, height, width):
        return super().decode(pipe, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor),
                              height, width)

    def train_conditioning(self, pipe, text, embeds, device):
        pe, pooled, ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=device,
                                             prompt_embeds=embeds.get("prompt_embeds"),
                                             pooled_prompt_embeds=embeds.get("pooled_prompt_embeds"))
        return pe, pooled, ids

    def train_call(self, pipe, height, width, device, dtype):
        img_ids = pipe._prepare_latent_image_ids(1, height // 16, width // 16, device, dtype)
        transformer = pipe.transformer

        def call(xt, sigma, cond):
            pe, pooled, ids = cond
            g = torch.ones_like(sigma) if transformer.config.guidance_embeds else None  # official: guidance 1.0
            return transformer(hidden_states=xt, timestep=sigma, guidance=g, pooled_projections=pooled,
                               encoder_hidden_states=pe, txt_ids=ids, img_ids=img_ids, return_dict=False)[0]
        return call


FAMILY = Flux(
    "flux.1-dev", "FLUX.1-dev", base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15,
    aliases=("flux", "flux1", "flux-dev", "flux.1"),
    recipe=dict(rank=16, alpha=64.0, lr=5e-4, weight_decay=0.01, caption_dropout=0.0),
    target_pattern=re.compile(r"(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0)$"),
    markers=("double_blocks", "single_blocks", "single_transformer_blocks"),
    comfy_config="Flux", pipeline="FluxPipeline", train_guidance=1.0)
