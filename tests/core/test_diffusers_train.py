"""One-image training on tiny diffusers pipelines with the shared glance_core step."""
import pytest
import torch

from glance_core import diffusers_glance as dg
from glance_core.diffusers_train import train_pair
from glance_core.errors import GlanceError
from glance_core.lora import read_lora
from test_diffusers_glance import SIZE, _embeds, _qwen_pipe


def _ref_latents():
    lat = torch.zeros(1, 16, 1, SIZE // 8, SIZE // 8)
    lat[:, :4, :, 8:24, 8:24] = 1.5
    lat[:, 8:, :, :, :16] = -1.0
    return lat


def test_train_save_and_generate_qwen(tmp_path):
    pipe = _qwen_pipe()
    pe, pm = _embeds(1)
    ee, em = _embeds(3)
    seen = []
    paths = train_pair(pipe, image_latents=_ref_latents(), prompt_embeds=pe, prompt_embeds_mask=pm,
                       empty_prompt_embeds=ee, empty_prompt_embeds_mask=em, steps=40, rank=4, learning_rate=1e-2,
                       out_dir=tmp_path, name="dpair", on_step=lambda ph, i, loss: seen.append((ph, i)))
    assert seen[0] == ("slow", 0) and seen[-1] == ("fast", 39) and len(seen) == 80
    for phase, path in paths.items():
        lora = read_lora(path)
        assert lora.layout == "glance" and lora.namespace == "diffusers" and lora.family == "qwen-image"
        assert len(lora.modules) == 24 and lora.glance.phase == phase and lora.glance.alpha == 16.0
        losses = lora.glance.extra["losses"]
        assert sum(losses[-8:]) < 0.9 * sum(losses[:8])
        # the saved file carries exactly the adapter that stays loaded in the transformer
        from peft.tuners.lora import LoraLayer
        for name, mod in pipe.transformer.named_modules():
            if isinstance(mod, LoraLayer) and dg.ADAPTERS[phase] in mod.lora_A:
                torch.testing.assert_close(mod.get_delta_weight(dg.ADAPTERS[phase]), lora.modules[name].delta(),
                                           rtol=1e-5, atol=1e-6)
    out = dg.generate(pipe, prompt_embeds=pe, prompt_embeds_mask=pm, true_cfg_scale=1.0, height=SIZE, width=SIZE,
                      generator=torch.Generator().manual_seed(0), output_type="latent", progress=False)
    plain = dg.generate(pipe, prompt_embeds=pe, prompt_embeds_mask=pm, true_cfg_scale=1.0, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
                        use_pair=False)
    ref = pipe._pack_latents(_ref_latents()[:, :, 0], 1, 16, SIZE // 8, SIZE // 8)
    assert ((out - ref) ** 2).mean() < ((plain - ref) ** 2).mean()
    with pytest.raises(GlanceError, match="exists"):
        train_pair(pipe, image_latents=_ref_latents(), prompt_embeds=pe, prompt_embeds_mask=pm, steps=1, rank=4,
                   out_dir=tmp_path, name="dpair")


def test_bad_training_inputs():
    pipe = _qwen_pipe()
    pe, pm = _embeds(1)
    with pytest.raises(GlanceError, match="give image"):
        train_pair(pipe, prompt_embeds=pe, prompt_embeds_mask=pm, steps=1)
    with pytest.raises(GlanceError, match="image: 200x256 px"):
        train_pair(pipe, image=torch.rand(1, 3, 256, 200), prompt_embeds=pe, prompt_embeds_mask=pm, steps=1)
    with pytest.raises(GlanceError, match="name: 'a/b'"):
        train_pair(pipe, image_latents=_ref_latents(), prompt_embeds=pe, prompt_embeds_mask=pm, steps=1,
                   out_dir="/tmp", name="a/b")


def _sd3_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                              pooled_projection_dim=32, out_channels=16, pos_embed_max_size=64)
    return StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None, transformer=t)


def test_train_save_and_generate_sd3(tmp_path):
    # SD3 used to fail here with AttributeError '_pack_latents': its family now packs (not at all) and calls.
    pipe = _sd3_pipe()
    g = torch.Generator().manual_seed(3)
    pe, pooled = torch.randn(1, 6, 32, generator=g), torch.randn(1, 32, generator=g)
    ref = _ref_latents()[:, :, 0]
    paths = train_pair(pipe, image_latents=ref, prompt_embeds=pe, pooled_prompt_embeds=pooled, steps=30, rank=4,
                       learning_rate=1e-2, out_dir=tmp_path, name="sd3pair", seed=2 ** 64 - 1)
    for phase, path in paths.items():
        lora = read_lora(path)
        assert lora.family == "sd3" and lora.glance.family == "sd3" and lora.glance.phase == phase
        assert len(lora.modules) == 2 * 4  # q, k, v, out of both joint blocks
        assert lora.glance.extra["hash_of"].startswith("normalised latent")
        losses = lora.glance.extra["losses"]
        assert sum(losses[-6:]) < sum(losses[:6])
    kw = dict(prompt_embeds=pe, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE, guidance_scale=1.0,
              output_type="latent", progress=False)
    out = dg.generate(pipe, generator=torch.Generator().manual_seed(0), **kw)
    plain = dg.generate(pipe, generator=torch.Generator().manual_seed(0), use_pair=False, **kw)
    assert out.shape == ref.shape
    assert ((out - ref) ** 2).mean() < ((plain - ref) ** 2).mean()


@pytest.mark.parametrize("kw,message", [
    (dict(learning_rate=float("nan")), "learning_rate: nan"),
    (dict(alpha=float("inf")), "alpha: inf"),
    (dict(seed=2 ** 64), "seed: "),
])
def test_bad_numbers_are_named_before_training(kw, message):
    pipe = _qwen_pipe()
    pe, pm = _embeds(1)
    with pytest.raises(GlanceError, match=message):
        train_pair(pipe, image_latents=_ref_latents(), prompt_embeds=pe, prompt_embeds_mask=pm, steps=1, **kw)


def test_nan_pixel_and_nan_prompt_are_named(tmp_path):
    pipe = _qwen_pipe()
    pe, pm = _embeds(1)
    lat = _ref_latents()
    lat[0, 0, 0, 3, 3] = float("nan")
    with pytest.raises(GlanceError, match="image_latents: 1 NaN"):
        train_pair(pipe, image_latents=lat, prompt_embeds=pe, prompt_embeds_mask=pm, steps=1)
    bad = pe.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(GlanceError, match="prompt_embeds: 1 NaN or infinite"):
        train_pair(pipe, image_latents=_ref_latents(), prompt_embeds=bad, prompt_embeds_mask=pm, steps=1)
    # output checks come before any training: a folder that is a file
    (tmp_path / "f").write_text("x")
    with pytest.raises(GlanceError, match="out_dir: .* is a file"):
        train_pair(pipe, image_latents=_ref_latents(), prompt_embeds=pe, prompt_embeds_mask=pm, steps=1,
                   out_dir=tmp_path / "f", name="x")
