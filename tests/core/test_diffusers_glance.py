"""Glance on diffusers pipelines with tiny real-architecture transformers: parity with the official loop."""
import numpy as np
import pytest
import torch

import lora_files as lf
import tiny_pipelines
from glance_core import diffusers_glance as dg
from glance_core.errors import GlanceError, LoraMismatchError
from glance_core.families import get_family
from glance_core.schedule import build_schedule

SIZE = 256


def _qwen_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    torch.manual_seed(0)
    t = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=t)


def _embeds(seed, tokens=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 32, generator=g), torch.ones(1, tokens, dtype=torch.long)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    slow = lf.write(d / "glance_qwen_slow.safetensors", lf.official_qwen_tensors(blocks=2, rank=4, seed=1))
    fast = lf.write(d / "glance_qwen_fast.safetensors", lf.official_qwen_tensors(blocks=2, rank=4, seed=2))
    pipe = _qwen_pipe()
    base_params = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    report = dg.load_pair(pipe, slow, fast)
    return pipe, slow, fast, base_params, report


def _gen(pipe, mode="consistent", cfg=4.0, seed=0, **kw):
    pe, pm = _embeds(1)
    npe, npm = _embeds(2)
    return dg.generate(pipe, prompt_embeds=pe, prompt_embeds_mask=pm, negative_prompt_embeds=npe,
                       negative_prompt_embeds_mask=npm, height=SIZE, width=SIZE, mode=mode, true_cfg_scale=cfg,
                       generator=torch.Generator().manual_seed(seed), output_type="latent", progress=False, **kw)


def _official_two_stage(pipe, cfg=4.0, seed=0):
    """The official Glance Qwen loop, re-implemented: stock scheduler grids, only the timesteps replaced."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
    sched = build_schedule("qwen-image", SIZE, SIZE)
    t = pipe.transformer
    pe, pm = _embeds(1)
    npe, npm = _embeds(2)
    latents = pipe.prepare_latents(1, 16, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(seed))
    img_shapes = [[(1, SIZE // 16, SIZE // 16)]]
    mu = calculate_shift(get_family("qwen-image").seq_len(SIZE, SIZE), 256, 8192, 0.5, 0.9)
    for adapter, n, phase in (("glance_slow", 50, "slow"), ("glance_fast", 5, "fast")):
        t.set_adapters([adapter])
        s = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                            max_shift=0.9, shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                            time_shift_type="exponential")
        s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
        s.timesteps = torch.tensor([1000 * x for x in sched.phase_sigmas(phase)], dtype=torch.float32)
        s.set_begin_index(0)
        for ts in s.timesteps:
            step = ts.expand(1) / 1000
            with torch.no_grad():
                pos = t(hidden_states=latents, timestep=step, encoder_hidden_states_mask=pm, encoder_hidden_states=pe,
                        img_shapes=img_shapes, return_dict=False)[0]
                neg = t(hidden_states=latents, timestep=step, encoder_hidden_states_mask=npm,
                        encoder_hidden_states=npe, img_shapes=img_shapes, return_dict=False)[0]
            comb = neg + cfg * (pos - neg)
            v = comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
            latents = s.step(v, ts, latents, return_dict=False)[0]
    return latents


def test_reference_mode_equals_the_official_two_stage_loop(qwen):
    pipe = qwen[0]
    ours = _gen(pipe, mode="reference")
    torch.testing.assert_close(ours, _official_two_stage(pipe), rtol=1e-5, atol=1e-5)


def test_consistent_mode_is_plain_euler_between_the_listed_sigmas(qwen):
    pipe = qwen[0]
    t = pipe.transformer
    sig = build_schedule("qwen-image", SIZE, SIZE).sigmas
    pe, pm = _embeds(1)
    npe, npm = _embeds(2)
    x = pipe.prepare_latents(1, 16, SIZE, SIZE, torch.float32, "cpu", torch.Generator().manual_seed(0))
    for i, (a, b) in enumerate(zip(sig, sig[1:])):
        t.set_adapters(["glance_slow" if i < 5 else "glance_fast"])
        step = torch.full((1,), a)
        with torch.no_grad():
            pos = t(hidden_states=x, timestep=step, encoder_hidden_states_mask=pm, encoder_hidden_states=pe,
                    img_shapes=[[(1, SIZE // 16, SIZE // 16)]], return_dict=False)[0]
            neg = t(hidden_states=x, timestep=step, encoder_hidden_states_mask=npm, encoder_hidden_states=npe,
                    img_shapes=[[(1, SIZE // 16, SIZE // 16)]], return_dict=False)[0]
        comb = neg + 4.0 * (pos - neg)
        x = x + (b - a) * comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    torch.testing.assert_close(_gen(pipe), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_gen(pipe), _gen(pipe, mode="reference"))


def test_one_transformer_two_adapters(qwen):
    pipe, slow, fast, base_params, report = qwen
    t = pipe.transformer
    assert set(t.peft_config) == {"glance_slow", "glance_fast"}
    assert "glance-official layout" in report and "as trained: scale 4" in report
    # The base weights are the same tensors' values, held once (LoRA layers wrap them).
    base_now = {n.replace(".base_layer", ""): p for n, p in t.named_parameters() if "lora_" not in n}
    assert set(base_now) == set(base_params)
    assert all(torch.equal(base_now[n], p) for n, p in base_params.items())
    # Switching really changes the model, and use_pair=False is the bare base model.
    with_pair, without = _gen(pipe), _gen(pipe, use_pair=False)
    assert (with_pair - without).abs().max() > 1e-4
    fresh = _qwen_pipe()
    torch.testing.assert_close(_gen(fresh, use_pair=False), without)


def test_deltas_and_policies(qwen):
    from peft.tuners.lora import LoraLayer
    pipe, slow, fast, _, _ = qwen
    ours = dg.read_lora(slow)
    seen = 0
    for name, mod in pipe.transformer.named_modules():
        if isinstance(mod, LoraLayer) and "glance_slow" in mod.lora_A:
            torch.testing.assert_close(mod.get_delta_weight("glance_slow"), ours.modules[name].delta())
            seen += 1
    assert seen == 24
    official = dg.peft_state_dict(dg.read_lora(slow, "as stored"), dg.AS_OFFICIAL)
    assert not any(".attn.to_q." in k or ".attn.to_out.0." in k for k in official)
    assert len(official) == 2 * 16  # 8 of 12 module types per block kept, at scale 1.0
    k = "transformer.transformer_blocks.0.img_mod.1"
    torch.testing.assert_close(official[k + ".lora_B.weight"], ours.modules["transformer_blocks.0.img_mod.1"].up.float())


def test_errors(qwen, tmp_path):
    pipe = qwen[0]
    flux_file = lf.write(tmp_path / "flux.safetensors", lf.kohya_tensors(["double_blocks.0.img_attn.qkv"]))
    with pytest.raises(LoraMismatchError, match="matched 0 of 1"):
        dg.load_pair(pipe, flux_file, flux_file)
    with pytest.raises(GlanceError, match="scale_policy must be one of"):
        dg.load_pair(pipe, flux_file, flux_file, "as wished")
    with pytest.raises(GlanceError, match="no Glance pair loaded"):
        dg.generate(_qwen_pipe(), prompt_embeds=_embeds(1)[0], prompt_embeds_mask=_embeds(1)[1], height=SIZE,
                    width=SIZE, output_type="latent", progress=False)
    with pytest.raises(GlanceError, match="width 250 must be a positive multiple of 16"):
        dg.generate(pipe, prompt_embeds=_embeds(1)[0], prompt_embeds_mask=_embeds(1)[1], height=SIZE, width=250,
                    output_type="latent", progress=False)


def test_flux_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    t = tiny_pipelines.tiny_flux_transformer()
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=t)
    slow = lf.write(tmp_path / "s.safetensors", lf.flux_diffusers_tensors(hidden=32, seed=1))
    fast = lf.write(tmp_path / "f.safetensors", lf.flux_diffusers_tensors(hidden=32, seed=2))
    dg.load_pair(pipe, slow, fast)
    pe = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    calls = []
    orig = t.set_adapters
    t.set_adapters = lambda names, *a, **k: (calls.append(tuple(names)), orig(names, *a, **k))[1]
    out = dg.generate(pipe, prompt_embeds=pe, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE,
                      guidance_scale=3.5, generator=torch.Generator().manual_seed(0), output_type="latent",
                      progress=False)
    assert calls == [("glance_slow",), ("glance_fast",)]  # one switch per phase, at the boundary
    plain = dg.generate(pipe, prompt_embeds=pe, pooled_prompt_embeds=pooled, height=SIZE, width=SIZE,
                        generator=torch.Generator().manual_seed(0), output_type="latent", progress=False,
                        use_pair=False)
    assert out.shape == (1, (SIZE // 16) ** 2, 64) and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4


def test_sd3_pipeline_and_batches(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(0)
    t = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
                              pooled_projection_dim=32, out_channels=16, pos_embed_max_size=64)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None, transformer=t)
    names = [n for n, m in t.named_modules() if n.endswith(("attn.to_q", "attn.to_v")) and "transformer_blocks" in n]
    for phase, seed in (("slow", 1), ("fast", 2)):
        sd = {}
        g = torch.Generator().manual_seed(seed)
        for n in names:
            sd[f"transformer.{n}.lora_A.weight"] = torch.randn(4, 32, generator=g) * 0.3
            sd[f"transformer.{n}.lora_B.weight"] = torch.randn(32, 4, generator=g) * 0.3
        lf.write(tmp_path / f"{phase}.safetensors", sd)
    dg.load_pair(pipe, tmp_path / "slow.safetensors", tmp_path / "fast.safetensors")
    g = torch.Generator().manual_seed(3)
    pe, npe = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    pooled, npooled = torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pooled,
              negative_pooled_prompt_embeds=npooled, height=SIZE, width=SIZE, guidance_scale=4.0,
              output_type="latent", progress=False)
    out = dg.generate(pipe, generator=torch.Generator().manual_seed(0), **kw)
    plain = dg.generate(pipe, generator=torch.Generator().manual_seed(0), use_pair=False, **kw)
    assert out.shape == (2, 16, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-4
    # The first image of the batch equals generating it alone: same noise draw, no mixing across the batch.
    one = dg.generate(pipe, generator=torch.Generator().manual_seed(0), **{
        **kw, "prompt_embeds": pe[:1], "negative_prompt_embeds": npe[:1], "pooled_prompt_embeds": pooled[:1],
        "negative_pooled_prompt_embeds": npooled[:1]})
    torch.testing.assert_close(one[0], out[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("names, label", [(["double_blocks.0.img_attn.qkv"], "FLUX"),
                                          (["joint_blocks.0.x_block.attn.qkv"], "SD3")])
def test_comfyui_named_loras_of_families_with_other_names_are_refused(tmp_path, names, label):
    # The family module says whether ComfyUI's names are diffusers' (Qwen-Image) or need converting.
    path = str(tmp_path / "comfy.safetensors")
    lf.write(path, lf.comfy_tensors(names))
    lora = dg.read_lora(path, "as stored")
    assert lora.namespace == "comfyui"
    with pytest.raises(GlanceError, match=f"{label}.*ComfyUI's own module naming need conversion"):
        dg.peft_state_dict(lora)
    qwen = str(tmp_path / "qwen.safetensors")
    lf.write(qwen, lf.comfy_tensors(["transformer_blocks.0.attn.to_q", "transformer_blocks.0.img_mod.1"]))
    assert set(dg.peft_state_dict(dg.read_lora(qwen, "as stored"))) == {
        f"transformer.transformer_blocks.0.{m}.lora_{ab}.weight" for m in ("attn.to_q", "img_mod.1") for ab in "AB"}
