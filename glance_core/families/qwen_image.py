"""Qwen-Image: dynamic shift up to 8192 tokens, terminal sigma 0.02, true CFG with the per-token norm rescale."""
import re

import torch

from .base import Family


class QwenImage(Family):
    """QwenImagePipeline: 16-channel video VAE (one frame) normalised by per-channel mean/std, packed 2x2."""

    def setup(self, pipe, *, prompt, negative_prompt, height, width, guidance, generator, n, embeds, device):
        pe, pm = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=n,
                                    prompt_embeds=embeds.get("prompt_embeds"),
                                    prompt_embeds_mask=embeds.get("prompt_embeds_mask"))
        npe, npm = embeds.get("negative_prompt_embeds"), embeds.get("negative_prompt_embeds_mask")
        true_cfg = guidance > 1 and (negative_prompt is not None or npe is not None)
        if true_cfg:
            npe, npm = pipe.encode_prompt(prompt=negative_prompt, device=device, num_images_per_prompt=n,
                                          prompt_embeds=npe, prompt_embeds_mask=npm)
        batch = pe.shape[0]
        latents = pipe.prepare_latents(batch, pipe.transformer.config.in_channels // 4, height, width, pe.dtype,
                                       device, generator)
        img_shapes = [[(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)]] * batch
        g = None
        if pipe.transformer.config.guidance_embeds:
            g = torch.full((batch,), 1.0, device=device, dtype=torch.float32)

        def run(x, sigma, emb, mask):
            return pipe.transformer(hidden_states=x, timestep=sigma, guidance=g, encoder_hidden_states_mask=mask,
                                    encoder_hidden_states=emb, img_shapes=img_shapes, return_dict=False)[0]

        def call(x, sigma):
            v = run(x, sigma, pe, pm)
            if not true_cfg:
                return v
            neg = run(x, sigma, npe, npm)
            comb = neg + guidance * (v - neg)
            return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return call, latents

    def _stats(self, vae, like):
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(like)
        std = torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(like)
        return mean, std

    def encode_image(self, pipe, image):
        vae = pipe.vae
        lat = vae.encode((image * 2 - 1).to(vae.device, vae.dtype)[:, :, None]).latent_dist.mode()
        mean, std = self._stats(vae, lat)
        return (lat - mean) / std

    def pack(self, pipe, lat):
        b, c, _, h, w = lat.shape
        return pipe._pack_latents(lat[:, :, 0], b, c, h, w)

    def decode(self, pipe, latents, height, width):
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        mean, std = self._stats(vae, latents)
        return vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]

    def train_conditioning(self, pipe, text, embeds, device):
        pe, pm = pipe.encode_prompt(prompt=text, device=device, prompt_embeds=embeds.get("prompt_embeds"),
                                    prompt_embeds_mask=embeds.get("prompt_embeds_mask"))
        return pe, pm

    def train_call(self, pipe, height, width, device, dtype):
        shapes = [[(1, height // 16, width // 16)]]

        def call(xt, sigma, cond):
            pe, pm = cond
            return pipe.transformer(hidden_states=xt, timestep=sigma, encoder_hidden_states=pe,
                                    encoder_hidden_states_mask=pm, img_shapes=shapes, return_dict=False)[0]
        return call


FAMILY = QwenImage(
    "qwen-image", "Qwen-Image", base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9,
    shift_terminal=0.02, aliases=("qwen", "qwen_image", "qwenimage"),
    recipe=dict(rank=32, alpha=128.0, lr=3e-4, weight_decay=0.0, caption_dropout=0.1),
    target_pattern=re.compile(r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|"
                              r"to_out\.0|to_add_out)|img_mlp\.net\.2|txt_mlp\.net\.2|img_mod\.1|txt_mod\.1)$"),
    markers=("img_mod_1", "txt_mod_1", "img_mlp_net", "txt_mlp_net"),
    comfy_config="QwenImage", pipeline="QwenImagePipeline", in_place_safe=True, guidance_arg="true_cfg_scale",
    comfyui_names_are_diffusers=True)
