"""The pair in the weight formats users really load, each against the exact result, on tiny real models.

fp8_e4m3fn checkpoints (built as ComfyUI's loader builds them), GGUF files loaded by city96's ComfyUI-GGUF,
and ComfyUI's partial (lowvram) loading. "Exact" is the stock two-sampler result on a float32 model whose
weights equal the dequantised ones, with each LoRA merged in float32 (so the only difference left is rounding).
"""
import os

import pytest
import torch

import comfy_runtime
import real_formats

SEED = 5
SIZE = 128  # pixels: a 16x16 latent
CFG = 2.0
STEPS = dict(base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5)


@pytest.fixture(scope="module")
def gp(pack):
    import glance_pack.nodes.loader_node as loader
    import glance_pack.nodes.sampler_node as sampler
    from glance_pack.glance_core.schedule import build_schedule

    class NS:
        pass
    ns = NS()
    ns.loader, ns.sampler, ns.build_schedule = loader, sampler, build_schedule
    return ns


@pytest.fixture(autouse=True)
def fresh_loads(comfy):
    """Every test loads its models itself (ComfyUI keeps loaded models, and their load mode, between calls)."""
    import comfy.model_management as mm
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def _pair_files(family, weights, rank=4, phases=(("slow", 11), ("fast", 12))):
    """A slow and a fast LoRA on every block linear, ComfyUI-native names with alpha: stock loaders and Glance
    apply the same scale. Returns their names in the loras folder."""
    from safetensors.torch import save_file
    layers = {k[:-len(".weight")]: v.shape for k, v in weights.items()
              if k.endswith(".weight") and v.dim() == 2 and "blocks." in k}
    names = []
    for phase, seed in phases:
        g = torch.Generator().manual_seed(seed)
        sd = {}
        for name, (fout, fin) in sorted(layers.items()):
            key = "diffusion_model." + name
            sd[key + ".lora_down.weight"] = torch.randn(rank, fin, generator=g) * 0.2
            sd[key + ".lora_up.weight"] = torch.randn(fout, rank, generator=g) * 0.2
            sd[key + ".alpha"] = torch.tensor(float(rank))
        names.append(f"real_{family}_{phase}.safetensors")
        save_file(sd, os.path.join(comfy_runtime.loras_dir(), names[-1]))
    return names


def _latent(family):
    n = SIZE // 8
    return {"samples": torch.zeros((1, 16, 1, n, n) if family == "qwen-image" else (1, 16, n, n))}


def _conds(family):
    return comfy_runtime.tiny_conditioning(family, seed=1), comfy_runtime.tiny_conditioning(family, seed=2)


def _with_lora(model, name, strength=1.0):
    """MODEL with the LoRA file `name` added the stock way (LoraLoaderModelOnly)."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    lora = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, lora, strength, 0)[0]


@torch.inference_mode()
def _glance(gp, model, family, files=None, under=None):
    """GlanceSampler's result on MODEL, after GlanceLoRAPairLoader loaded `files` (slow, fast) onto it (on top
    of the stock LoRA file `under`, if given)."""
    if under is not None:
        model = _with_lora(model, under, 0.5)
    if files is not None:
        model = gp.loader.GlanceLoRAPairLoader.execute(model=model, slow_lora=files[0], fast_lora=files[1],
                                                       strength_slow=1.0, strength_fast=1.0,
                                                       scale_policy="as trained").result[0]
    pos, neg = _conds(family)
    out = gp.sampler.GlanceSampler.execute(model=model, positive=pos, negative=neg, latent_image=_latent(family),
                                           seed=SEED, cfg=CFG, sampler_name="euler", mode="consistent",
                                           family="auto", **STEPS)
    return out.result[0]["samples"], model


@torch.inference_mode()
def _stock(gp, model, family, files, under=None):
    """The stock way: LoraLoader merges the slow file, sample the slow sigmas, then the fast file for the rest
    (each on top of the stock LoRA file `under`, if given)."""
    import comfy.sample
    import comfy.samplers
    sched = gp.build_schedule({"flux": "flux.1-dev"}.get(family, family), SIZE, SIZE, **STEPS)
    sigmas = torch.tensor(sched.sigmas, dtype=torch.float32)
    cut = sched.steps.index(next(s for s in sched.steps if s.phase == "fast"))
    latent = comfy.sample.fix_empty_latent_channels(model, _latent(family)["samples"])
    noise = comfy.sample.prepare_noise(latent, SEED)
    pos, neg = _conds(family)
    x = latent
    if under is not None:
        model = _with_lora(model, under, 0.5)
    for i, (name, sig) in enumerate(((files[0], sigmas[:cut + 1]), (files[1], sigmas[cut:]))):
        merged = _with_lora(model, name)
        x = comfy.sample.sample_custom(merged, noise if i == 0 else torch.zeros_like(noise), CFG,
                                       comfy.samplers.sampler_object("euler"), sig, pos, neg, x, seed=SEED)
    return x


@pytest.fixture
def folded(monkeypatch, pack):
    """Spy on the runtime's folded path: one entry per layer call, True when it used the stored weight
    itself, False when the layer's cast copy (which then takes the delta, or the product onto the branch)."""
    from glance_pack.glance_core import runtime
    calls, real = [], runtime._fused

    def spy(slot, module, x, weight, bias):
        calls.append(weight is module.weight)
        return real(slot, module, x, weight, bias)
    monkeypatch.setattr(runtime, "_fused", spy)
    return calls


def _rel(a, b, effect):
    """Largest difference of a and b, as a fraction of the pair's largest effect on the result."""
    return float((a.float() - b.float()).abs().max() / effect)


# ---------------------------------------------------------------------------------------------------------- fp8

@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_fp8_checkpoint_equals_exact_where_a_stock_merge_does_not(gp, family, folded):
    weights = real_formats.checkpoint(family)
    fp8, dequantised = real_formats.fp8_model(family, weights)
    files = _pair_files(family, weights)
    exact_model = real_formats.fp32_model(family, dequantised)
    exact = _stock(gp, exact_model, family, files)
    base, _ = _glance(gp, exact_model, family)  # no pair
    effect = float((exact - base).abs().max())
    assert effect > 1e-2  # the pair really changes the result

    ours, _ = _glance(gp, fp8, family, files)
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4)  # the pair's whole effect, exactly
    assert folded and not any(folded)  # every adapted layer folded the pair into its cast copy, never the fp8
    # The fp8 weights are untouched by the pair (still the checkpoint's).
    assert all(torch.equal(v.float().cpu(), dequantised[k]) for k, v in fp8.model.diffusion_model.state_dict().items())

    # The contrast: ComfyUI merging the same LoRAs into fp8 weights rounds the merged weights back to fp8
    # (stochastic rounding), an error of a sizeable fraction of the pair's effect.
    stock = _stock(gp, fp8, family, files)
    stock_err, ours_err = _rel(stock, exact, effect), _rel(ours, exact, effect)
    print(f"{family} fp8: stock merge error {stock_err:.2%} of the pair's effect, Glance {ours_err:.2e}")
    assert stock_err > 0.01 and ours_err < 1e-3


# --------------------------------------------------------------------------------------------------------- GGUF

@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_gguf_model_through_comfyui_gguf_equals_exact(gp, comfyui_gguf, tiny_detection, family):
    import folder_paths
    weights = real_formats.checkpoint(family)
    name = f"tiny_{family}_Q8_0.gguf"
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], name)
    kinds = real_formats.write_gguf(path, weights, comfy_runtime.TINY_CONFIGS[family]["image_model"])
    assert kinds.get("Q8_0", 0) >= 10 and kinds.get("F16") and kinds.get("F32")

    with torch.inference_mode():
        model = comfyui_gguf.nodes.UnetLoaderGGUF().load_unet(name)[0]
    assert isinstance(model, comfyui_gguf.nodes.GGUFModelPatcher)
    ggml = comfyui_gguf.ops.GGMLTensor
    layer = real_formats.a_block_linear(model.model, family)
    assert isinstance(layer, comfyui_gguf.ops.GGMLOps.Linear) and isinstance(layer.weight, ggml)
    assert layer.weight.tensor_type.name == "Q8_0" and layer.weight.dtype == torch.uint8  # still quantised

    dequantised = real_formats.gguf_runtime_weights(comfyui_gguf, model)
    assert dequantised.keys() == weights.keys()
    assert all((dequantised[k] - v).abs().max() < 2e-3 for k, v in weights.items())  # the file holds the model

    files = _pair_files(family, weights)
    exact_model = real_formats.fp32_model(family, dequantised)
    exact = _stock(gp, exact_model, family, files)
    base, _ = _glance(gp, exact_model, family)
    effect = float((exact - base).abs().max())
    assert effect > 1e-2

    ours, _ = _glance(gp, model, family, files)
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4)
    assert isinstance(layer.weight, ggml) and layer.weight.tensor_type.name == "Q8_0"  # still quantised after
    # ComfyUI-GGUF applies stock LoRAs at dequantisation, in float32: exact as well (a check on the reference).
    torch.testing.assert_close(_stock(gp, model, family, files), exact, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------- partial loading

@pytest.mark.parametrize("family,weights,stacked", [("qwen-image", "fp32", False), ("qwen-image", "fp32", True),
                                                    ("qwen-image", "fp8", False), ("flux", "fp8", False)])
def test_partial_loading_equals_exact(gp, lowvram, family, weights, stacked, folded):
    """Offloaded layers run through comfy_cast_weights (and, stacked, a stock LoRA's LowVramPatch); the pair's
    branches still add the exact delta. (A stock LoRA on fp8 weights is not exact by itself: see above.)"""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    checkpoint = real_formats.checkpoint(family)
    if weights == "fp8":
        model, dequantised = real_formats.fp8_model(family, checkpoint)
    else:
        model, dequantised = real_formats.fp32_model(family, checkpoint), checkpoint
    files = _pair_files(family, checkpoint)
    under = _pair_files(family, checkpoint, phases=(("stock", 13),))[0] if stacked else None
    exact = _stock(gp, real_formats.fp32_model(family, dequantised), family, files, under)  # loaded fully
    mm.unload_all_models()

    lowvram.on = True
    ours, paired = _glance(gp, model, family, files, under)
    assert lowvram.loads and all(partial for partial, _ in lowvram.loads)  # really loaded partially
    offloaded = lowvram.loads[0][1]
    assert all(m.comfy_cast_weights for m in offloaded)
    adapted = {comfy.utils.get_attr(paired.model, k[:-len(".lora_up.weight")])
               for k in comfy.utils.load_torch_file(folder_paths.get_full_path("loras", files[0]))
               if k.endswith(".lora_up.weight")}
    assert adapted & offloaded and adapted - offloaded  # some adapted layers offloaded, some loaded
    if stacked:  # the stock LoRA reaches the offloaded layers as LowVramPatch weight functions
        assert all(any(type(f).__name__ == "LowVramPatch" for f in m.weight_function) for m in adapted & offloaded)
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4)
    # Folded everywhere: into the stored float32 weights' product, or into the copy a cast or patch made (fp8,
    # a stock LoRA's patch, or offloaded weights brought from the CPU to a GPU).
    copies = weights == "fp8" or stacked or mm.get_torch_device().type != "cpu"
    assert folded and all(folded) != copies


def test_which_comfy_layers_fold(pack, comfyui_gguf):
    """ComfyUI's plain and manual-cast Linear fold the pair into their product (checked at import against this
    ComfyUI); fp8 scaled matmuls and ComfyUI-GGUF's dequantizing layers keep the separate branch."""
    import comfy.ops
    from glance_pack.glance_core import runtime
    from glance_pack.nodes import pair
    assert pair._comfy_linear_is_plain()
    for cls in (comfy.ops.disable_weight_init.Linear, comfy.ops.manual_cast.Linear):
        assert runtime._weights_of(cls) is pair._comfy_weights
    for cls in (comfy.ops.fp8_ops.Linear, comfyui_gguf.ops.GGMLOps.Linear):
        assert runtime._weights_of(cls) is None
