"""Hostile input at the nodes: explicit-schedule pairs, latents of odd or extreme sizes, broken files."""
import os

import pytest
import torch

import comfy_runtime
import lora_files as lf

SEED = 3
STEPS = dict(base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5)


@pytest.fixture(scope="module")
def gp(pack):
    class NS:
        pass
    ns = NS()
    ns.pack = pack
    import glance_pack.glance_core.lora as lora
    import glance_pack.nodes.loader_node as loader
    import glance_pack.nodes.pair as pair
    import glance_pack.nodes.sampler_node as sampler
    import glance_pack.nodes.schedule_node as schedule
    from glance_pack.glance_core.errors import GlanceError
    from glance_pack.glance_core.schedule import build_schedule
    ns.lora, ns.loader, ns.pair, ns.sampler, ns.schedule = lora, loader, pair, sampler, schedule
    ns.GlanceError, ns.build_schedule = GlanceError, build_schedule
    return ns


@pytest.fixture(scope="module")
def models(comfy):
    return {f: comfy_runtime.tiny_model(f) for f in ("sd3", "flux")}


def _cond(family):
    return comfy_runtime.tiny_conditioning(family, seed=1), comfy_runtime.tiny_conditioning(family, seed=2)


def _sample(gp, model, family, samples, **kw):
    pos, neg = _cond(family)
    args = dict(seed=SEED, cfg=1.0, sampler_name="euler", mode="consistent", family="auto", **STEPS)
    args.update(kw)
    return gp.sampler.GlanceSampler.execute(model=model, positive=pos, negative=neg,
                                            latent_image={"samples": samples}, **args).result[0]["samples"]


def _explicit_pair(gp, model):
    """A pair as the trainer writes it for a flow model without a preset: family 'explicit', base sigmas kept."""
    import comfy.samplers
    base = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 50)
    sched = gp.build_schedule("explicit", 256, 256, base_sigmas=base.tolist())
    layers = comfy_runtime.linear_layers(model, include=("joint_blocks",))
    names = []
    for phase, seed in (("slow", 1), ("fast", 2)):
        g = torch.Generator().manual_seed(seed)
        mods = {n: (torch.randn(2, i, generator=g) * 0.3, torch.randn(o, 2, generator=g) * 0.3, 4.0)
                for n, (i, o) in layers.items()}
        meta = gp.lora.GlanceMeta(phase=phase, family="explicit", sigmas=sched.phase_sigmas(phase), rank=2,
                                  alpha=4.0, target_modules=sorted(layers), schedule=sched.to_dict())
        name = f"explicit_{phase}.safetensors"
        path = os.path.join(comfy_runtime.loras_dir(), name)
        if os.path.exists(path):
            os.remove(path)
        gp.lora.save_lora(path, mods, meta.to_header())
        names.append(name)
    return names, sched


def test_explicit_schedule_pair_samples_everywhere(gp, models, monkeypatch):
    import comfy.sample
    import comfy.samplers
    # The tiny SD3 model stands in for a flow model no preset knows.
    for mod in (gp.loader, gp.schedule):
        monkeypatch.setattr(mod, "family_of", lambda model: None)
    model = models["sd3"]
    (slow, fast), sched = _explicit_pair(gp, model)
    loaded, report = gp.loader.GlanceLoRAPairLoader.execute(model=model, slow_lora=slow, fast_lora=fast,
                                                            strength_slow=1.0, strength_fast=1.0,
                                                            scale_policy="as trained").result
    pair = gp.pair.pair_of(loaded)
    assert pair.family == "explicit" and pair.base_sigmas == sched.base_sigmas
    expected = [(round(s.sigma, 5), s.phase) for s in sched.steps]

    pair.trace = []
    out = _sample(gp, loaded, "sd3", torch.zeros(1, 16, 32, 32))
    assert torch.isfinite(out).all()
    assert [(round(s, 5), p) for s, p in pair.trace] == expected

    # Reloaded pair + GlanceSchedule + a stock sampler: the same sigmas, the same switch.
    sigmas = gp.schedule.GlanceSchedule.execute(model=loaded, latent=None, width=256, height=256, family="auto",
                                                base_sigmas=None, **STEPS).result[0]
    torch.testing.assert_close(sigmas, torch.tensor(sched.sigmas, dtype=torch.float32))
    pair.trace = []
    latent = comfy.sample.fix_empty_latent_channels(loaded, torch.zeros(1, 16, 32, 32))
    pos, neg = _cond("sd3")
    stock = comfy.sample.sample_custom(loaded, comfy.sample.prepare_noise(latent, SEED), 1.0,
                                       comfy.samplers.sampler_object("euler"), sigmas, pos, neg, latent, seed=SEED)
    assert [(round(s, 5), p) for s, p in pair.trace] == expected
    torch.testing.assert_close(stock, out)


def test_flux_latent_of_a_multiple_of_8_not_16_is_sampled(gp, models):
    # EmptyLatentImage at 136x192 px (as 1080x1920): 17 rows of cells, which FLUX pads to 18.
    model = models["flux"]
    samples = torch.zeros(1, 16, 17, 24)
    out = _sample(gp, model, "flux", samples)
    assert out.shape == samples.shape and torch.isfinite(out).all()
    sig = gp.schedule.GlanceSchedule.execute(model=model, latent={"samples": samples}, width=16, height=16,
                                             family="auto", base_sigmas=None, **STEPS).result[0]
    torch.testing.assert_close(sig, torch.tensor(gp.build_schedule("flux", 192, 144).sigmas, dtype=torch.float32))


def test_extreme_sizes_are_refused_by_name(gp, models):
    model = models["flux"]
    # A FLUX latent of 8192x8192 px: every sigma would be 1.0; refused before any model call, naming the input.
    with pytest.raises(gp.GlanceError, match=r"^latent_image: .*works up to about"):
        _sample(gp, model, "flux", torch.zeros(1, 16, 1024, 1024))
    for family in ("flux.1-dev", "qwen-image"):
        with pytest.raises(gp.GlanceError, match="works up to about"):
            gp.schedule.GlanceSchedule.execute(model=model, latent=None, width=16384, height=16384, family=family,
                                               base_sigmas=None, **STEPS)
    out = gp.schedule.GlanceSchedule.execute(model=model, latent=None, width=16384, height=16384, family="sd3",
                                             base_sigmas=None, **STEPS).result[0]
    assert (out[1:] < out[:-1]).all()


def test_broken_files_are_named_at_the_loader(gp, models, tmp_path):
    d = comfy_runtime.loras_dir()
    sd = lf.kohya_tensors(["joint_blocks.0.x_block.attn.qkv"], rank=2, fin=4, fout=4)
    sd[next(k for k in sd if k.endswith("lora_up.weight"))][0, 0] = float("nan")
    lf.write(os.path.join(d, "hostile_nan.safetensors"), sd)
    with open(os.path.join(d, "hostile_nested.safetensors"), "wb") as f:
        body = ('{"a": ' + "[" * 100000 + "]" * 100000 + "}").encode()
        f.write(len(body).to_bytes(8, "little") + body)
    for name, msg in (("hostile_nan.safetensors", "NaN or infinite"), ("hostile_nested.safetensors", "JSON")):
        with pytest.raises(gp.GlanceError, match=rf"^slow_lora: .*{name}: .*{msg}"):
            gp.loader.GlanceLoRAPairLoader.execute(model=models["sd3"], slow_lora=name, fast_lora=name,
                                                   strength_slow=1.0, strength_fast=1.0, scale_policy="as trained")
