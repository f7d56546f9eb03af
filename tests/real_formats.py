"""Tiny ComfyUI models in the weight formats users load (fp32, fp8_e4m3fn as ComfyUI builds it, GGUF as
ComfyUI-GGUF's convert tool writes it), shared by the sampling and the training tests."""
import torch

import comfy_runtime

FP8 = torch.float8_e4m3fn


def checkpoint(family):
    """The float32 weights a tiny checkpoint of `family` is made from (diffusion-model keys)."""
    return {k: v.clone() for k, v in comfy_runtime.tiny_model(family).model.diffusion_model.state_dict().items()}


def patcher(model):
    """A ModelPatcher of `model` on the test device, as ComfyUI's loaders build one."""
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@torch.inference_mode()  # as ComfyUI runs every node, loaders and samplers alike
def fp32_model(family, weights):
    """A float32 model of `family` holding exactly `weights` (e.g. the dequantised ones)."""
    model = comfy_runtime.tiny_config(family).get_model({})
    model.diffusion_model.to(torch.float32)
    missing, unexpected = model.diffusion_model.load_state_dict({k: v.float() for k, v in weights.items()})
    assert not missing and not unexpected
    return patcher(model)


@torch.inference_mode()
def fp8_model(family, weights, compute=torch.float32):
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
    assert isinstance(a_block_linear(model, family), comfy.ops.manual_cast.Linear)
    return patcher(model), {k: v.float() for k, v in loaded.items()}


def a_block_linear(model, family):
    """One adapted linear layer of a BaseModel of `family`."""
    dm = model.diffusion_model
    return dm.transformer_blocks[0].attn.to_q if family == "qwen-image" else dm.double_blocks[0].img_attn.qkv


def write_gguf(path, weights, arch):
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


def gguf_runtime_weights(comfyui_gguf, model):
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
