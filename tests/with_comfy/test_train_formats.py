"""Training a pair on the models users load: ordinary parameters, fp8_e4m3fn weights, a GGUF file through
ComfyUI-GGUF, and ComfyUI's partial loading. Each gives the pair a fully loaded float32 run on the same
(dequantised) weights gives, and no base weight ever gets a gradient."""
import os

import pytest
import torch
from safetensors.torch import load_file

import comfy_runtime
import real_formats

FAMILY = "qwen-image"
SIZE = 256
STEPS = 3
# Same weights, same draws; only the float rounding of the layer math differs (cast per layer, partial loads).
TOL = dict(rtol=2e-3, atol=2e-5)


@pytest.fixture(scope="module")
def tn(pack):
    import glance_pack.nodes.train_node as tn
    return tn


@pytest.fixture(scope="module")
def vae(pack):
    mod = comfy_runtime.stand_ins()
    return mod.tiny_vae(FAMILY)


@pytest.fixture(autouse=True)
def fresh_loads(comfy):
    import comfy.model_management as mm
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def _image():
    img = torch.zeros(1, SIZE, SIZE, 3)
    img[:, 64:192, 64:192, 0] = 1.0
    img[..., 2] = torch.linspace(0, 1, SIZE)[None, :, None]
    return img


def _train(tn, model, vae, name, **kw):
    """Train both LoRAs; returns {phase: {tensor name: tensor}} as saved."""
    args = dict(image=_image(), positive=comfy_runtime.tiny_conditioning(FAMILY, seed=1),
                empty_prompt=comfy_runtime.tiny_conditioning(FAMILY, seed=2), output_name=name, steps=STEPS,
                learning_rate=1e-2, rank=4, alpha=0.0, caption_dropout=0.0, seed=3, training_dtype="fp32",
                resolution=SIZE, phases="both", gradient_checkpointing=True, overwrite=True,
                export_diffusers=False, image_index=-1)
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI runs nodes
        _, slow, fast, _ = tn.train_pair(model, vae, **args)
    return {"slow": load_file(slow), "fast": load_file(fast)}


def _assert_same_pair(got, want):
    for phase in ("slow", "fast"):
        assert got[phase].keys() == want[phase].keys()
        moved = 0
        for k, v in want[phase].items():
            torch.testing.assert_close(got[phase][k], v, **TOL, msg=lambda m: f"{phase} {k}: {m}")
            moved += k.endswith("lora_up.weight") and bool(v.abs().max() > 0)
        assert moved > 0  # trained away from the zero init: the comparison is about something


def test_no_base_weight_gets_a_gradient(tn, vae):
    """A model whose weights are ordinary trainable parameters (as scripts build them): training freezes them
    for its run (no .grad is ever allocated) and gives the user's model back as it was."""
    model = comfy_runtime.tiny_model(FAMILY)  # built outside inference mode: requires_grad=True everywhere
    params = dict(model.model.diffusion_model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    seen = []
    for p in params.values():
        p.register_hook(lambda g, seen=seen: seen.append(g))
    before = {k: p.detach().clone() for k, p in params.items()}
    _train(tn, model, vae, "fmt_frozen")
    assert not seen  # no gradient was ever computed for a base weight
    after = dict(model.model.diffusion_model.named_parameters())
    assert all(p.grad is None for p in after.values())
    assert all(p.requires_grad for p in after.values())  # the user's flags are restored
    assert all(torch.equal(after[k].detach(), v) for k, v in before.items())  # and the weights untouched


def test_fp8_weights_train_the_pair_of_their_dequantised_fp32_model(tn, vae):
    weights = real_formats.checkpoint(FAMILY)
    fp8, dequantised = real_formats.fp8_model(FAMILY, weights)
    want = _train(tn, real_formats.fp32_model(FAMILY, dequantised), vae, "fmt_fp32")
    got = _train(tn, fp8, vae, "fmt_fp8")
    _assert_same_pair(got, want)
    assert all(v.dtype == real_formats.FP8 for v in fp8.model.diffusion_model.state_dict().values())


def test_gguf_model_trains_the_pair_of_its_dequantised_fp32_model(tn, vae, comfyui_gguf, tiny_detection):
    import folder_paths
    weights = real_formats.checkpoint(FAMILY)
    name = "tiny_train_Q8_0.gguf"
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], name)
    real_formats.write_gguf(path, weights, comfy_runtime.TINY_CONFIGS[FAMILY]["image_model"])
    with torch.inference_mode():
        model = comfyui_gguf.nodes.UnetLoaderGGUF().load_unet(name)[0]
    layer = real_formats.a_block_linear(model.model, FAMILY)
    assert isinstance(layer.weight, comfyui_gguf.ops.GGMLTensor) and layer.weight.tensor_type.name == "Q8_0"
    dequantised = real_formats.gguf_runtime_weights(comfyui_gguf, model)
    want = _train(tn, real_formats.fp32_model(FAMILY, dequantised), vae, "fmt_gguf_ref")
    got = _train(tn, model, vae, "fmt_gguf")
    _assert_same_pair(got, want)
    assert layer.weight.tensor_type.name == "Q8_0"  # still quantised after training


@pytest.mark.parametrize("weights", ["fp32", "fp8"])
def test_partial_loading_trains_the_pair_of_a_full_load(tn, vae, lowvram, weights):
    import comfy.model_management as mm
    checkpoint = real_formats.checkpoint(FAMILY)
    if weights == "fp8":
        model, dequantised = real_formats.fp8_model(FAMILY, checkpoint)
    else:
        model, dequantised = real_formats.fp32_model(FAMILY, checkpoint), checkpoint
    want = _train(tn, real_formats.fp32_model(FAMILY, dequantised), vae, f"fmt_full_{weights}")
    mm.unload_all_models()
    lowvram.on = True
    got = _train(tn, model, vae, f"fmt_partial_{weights}")
    assert lowvram.loads and all(partial for partial, _ in lowvram.loads)
    assert lowvram.loads[0][1]  # some layers were left offloaded, cast per forward
    _assert_same_pair(got, want)


def test_memory_is_reported_before_the_first_step_and_a_run_that_cannot_fit_is_refused(tn, vae, caplog, pack):
    import logging
    from glance_pack.glance_core import memory
    from glance_pack.glance_core.errors import GlanceError
    from glance_pack.nodes.training import training_memory, training_targets
    model = comfy_runtime.tiny_model(FAMILY)
    with caplog.at_level(logging.INFO, logger="glance"):
        _train(tn, model, vae, "fmt_mem", steps=1)
    lines = [r.getMessage() for r in caplog.records]
    report = next(i for i, m in enumerate(lines) if m.startswith("Glance train: device memory about"))
    assert report < next(i for i, m in enumerate(lines) if "step 1/1" in m)  # before the first step
    assert "LoRA and optimizer" in lines[report] and "activations" in lines[report]

    targets = training_targets(model, FAMILY)
    tokens = (SIZE // 16) ** 2 + 6
    est = training_memory(model, targets, 4, tokens, torch.float32, True, None)
    lora_params = sum(p.numel() for p in load_file(os.path.join(
        comfy_runtime.loras_dir(), "glance", "fmt_mem_slow.safetensors")).values() if p.dim() == 2)
    assert est.lora == 16 * lora_params  # parameter, gradient and AdamW's two moments, float32
    assert est.activations == memory.activation_bytes(tokens, 32, 2, 4, True)  # width 32, 2 blocks
    # fp8 weights are cast per layer to the compute dtype, and backward keeps the copies: one block's with
    # checkpointing, every block's without.
    fp8, _ = real_formats.fp8_model(FAMILY, real_formats.checkpoint(FAMILY))
    block = sum(p.numel() for p in fp8.model.diffusion_model.transformer_blocks[0].parameters()
                if p.dtype == real_formats.FP8) * 4
    assert block > 0
    for ckpt, copies in ((True, block), (False, 2 * block)):
        got = training_memory(fp8, targets, 4, tokens, torch.float32, ckpt, None).activations
        assert got == memory.activation_bytes(tokens, 32, 2, 4, ckpt) + copies
    # Room for everything: nothing offloaded. Room for all but some weights: those are streamed. No room for
    # the activations: refused, naming what to change.
    # free_bytes counts what the device has beyond the weights the model holds loaded already.
    size, held = model.model_size(), model.loaded_size()
    room = est.lora + est.activations - held
    fits = training_memory(model, targets, 4, tokens, torch.float32, True, room + 10 * size)
    assert fits.offloaded == 0 and fits.weights == size
    tight = training_memory(model, targets, 4, tokens, torch.float32, True, room + size // 2)
    assert tight.offloaded == size - size // 2 and tight.total == size // 2 + est.lora + est.activations
    with pytest.raises(GlanceError, match="turn gradient_checkpointing on, lower rank"):
        training_memory(model, targets, 4, tokens, torch.float32, False, room)


def test_the_node_refuses_before_training_and_names_its_settings(tn, monkeypatch, pack):
    import comfy.model_management as mm
    from glance_pack.glance_core.errors import GlanceError
    model = comfy_runtime.tiny_model(FAMILY)
    with torch.inference_mode():
        p = tn.prepare(model, _image(), comfy_runtime.tiny_conditioning(FAMILY, seed=1), None, "fmt_refuse", 2,
                       1e-2, 4, 0.0, 0.0, 0, "fp32", SIZE, "both", False, True, False, -1)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 0)
    x0 = torch.zeros(1, 16, 1, SIZE // 8, SIZE // 8)
    with pytest.raises(GlanceError, match=r"free\. Lower resolution, turn gradient_checkpointing on, lower rank.*"
                                          r"\(resolution 256x256, rank 4, gradient_checkpointing False, "
                                          r"training_dtype fp32\)"):
        tn.fit_memory(model, p, x0, torch.device("cuda"))
    assert not os.path.exists(os.path.join(comfy_runtime.loras_dir(), "glance", "fmt_refuse_slow.safetensors"))
