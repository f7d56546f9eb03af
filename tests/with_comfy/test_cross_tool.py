"""Pairs move between the ComfyUI nodes and the diffusers side with the same weight deltas (FLUX: fused qkv in
ComfyUI, separate q/k/v in diffusers)."""
import os

import torch

import comfy_runtime
import tiny_pipelines


def _diffusers_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tiny_pipelines.tiny_flux_transformer(heads=4))


def _comfy_fused_deltas(patcher, path):
    """{diffusers name: delta} as stock ComfyUI merges the file into the tiny FLUX's fused layers."""
    base, after, _ = comfy_runtime.stock_merged(patcher, path)
    h = 64
    out = {}
    for blk, fused in (("transformer_blocks.0", "double_blocks.0.img_attn.qkv"),
                       ("single_transformer_blocks.0", "single_blocks.0.linear1")):
        d = after[f"diffusion_model.{fused}.weight"] - base[f"diffusion_model.{fused}.weight"]
        for i, p in enumerate(("to_q", "to_k", "to_v")):
            out[f"{blk}.attn.{p}"] = d[i * h:(i + 1) * h]
    d = after["diffusion_model.double_blocks.0.img_attn.proj.weight"] - base["diffusion_model.double_blocks.0.img_attn.proj.weight"]
    out["transformer_blocks.0.attn.to_out.0"] = d
    return out


def test_pair_trained_in_diffusers_loads_in_comfyui(pack, tmp_path):
    from glance_pack.glance_core.diffusers_train import train_pair
    from glance_pack.nodes.loader_node import load_pair
    pipe = _diffusers_flux()
    pe = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    lat = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(3))
    folder = os.path.join(comfy_runtime.loras_dir(), "from_diffusers")
    paths = train_pair(pipe, image_latents=lat, prompt_embeds=pe, pooled_prompt_embeds=pooled, steps=3, rank=4,
                       learning_rate=1e-2, out_dir=folder, name="fx", overwrite=True)
    flux = comfy_runtime.tiny_model("flux")
    model, report = load_pair(flux, "from_diffusers/fx_slow.safetensors", "from_diffusers/fx_fast.safetensors",
                              1.0, 1.0, "as trained")
    assert "glance layout, flux.1-dev, 7 modules" in report
    for phase, adapter in (("slow", "glance_slow"), ("fast", "glance_fast")):
        want = tiny_pipelines.peft_deltas(pipe.transformer, adapter)
        got = _comfy_fused_deltas(flux, paths[phase])
        assert set(want) == set(got) and len(got) == 7  # every adapted module, none missing on either side
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


def test_pair_trained_by_the_comfyui_node_loads_in_diffusers(pack, tmp_path):
    from glance_pack.glance_core import diffusers_glance as dg
    from glance_pack.glance_core.lora import read_lora
    from glance_pack.nodes.train_node import train_pair
    stand_ins = comfy_runtime.stand_ins()
    flux = comfy_runtime.tiny_model("flux")
    img = torch.rand(1, 256, 256, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, slow, fast, _ = train_pair(flux, stand_ins.tiny_vae("flux"), img, comfy_runtime.tiny_conditioning("flux"),
                                      None, "from_comfy", 3, 1e-2, 4, 0.0, 0.0, 0, "fp32", 256, "both", True, True,
                                      False, -1)
    pipe = _diffusers_flux()
    dg.load_pair(pipe, slow, fast)
    for phase, path in (("slow", slow), ("fast", fast)):
        want = tiny_pipelines.peft_deltas(pipe.transformer, dg.ADAPTERS[phase])
        lora = read_lora(path)
        assert set(want) == set(lora.modules)
        got = _comfy_fused_deltas(flux, path)
        for name, delta in want.items():
            torch.testing.assert_close(delta, lora.modules[name].delta(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[name], delta, rtol=1e-4, atol=1e-6)
