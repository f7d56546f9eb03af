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
