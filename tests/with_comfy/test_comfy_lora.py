"""Files in each layout, read by glance_core, against what ComfyUI's own stock LoRA path does with them."""
import pytest
import torch

import comfy_runtime
import lora_files as lf


_merged = comfy_runtime.stock_merged


@pytest.fixture(scope="module")
def qwen(comfy):
    return comfy_runtime.tiny_model("qwen-image")


def test_official_qwen_file_patches_all_12_module_types(pack, qwen, tmp_path):
    from glance_pack.glance_core.lora import read_lora
    path = lf.write(tmp_path / "glance_qwen_fast.safetensors", lf.official_qwen_tensors(blocks=2, rank=4))
    base, merged, patched = _merged(qwen, path)
    want = {f"diffusion_model.transformer_blocks.{b}.{m}.weight" for b in range(2) for m in lf.QWEN_ATTN + lf.QWEN_OTHER}
    assert patched == want  # ComfyUI reads all 12 types, the ".lora.down" attention ones included
    # Stock ComfyUI applies alpha = rank (scale 1.0): exactly our "as stored" policy.
    stored = read_lora(path, "as stored")
    for name, m in stored.modules.items():
        k = f"diffusion_model.{name}.weight"
        torch.testing.assert_close(merged[k] - base[k], m.delta(), rtol=1e-4, atol=1e-5)


def test_written_file_loads_in_stock_comfyui_at_the_trained_scale(pack, qwen, tmp_path):
    from glance_pack.glance_core.lora import read_lora, save_lora
    src = read_lora(lf.write(tmp_path / "official.safetensors", lf.official_qwen_tensors(blocks=2, rank=4)))
    modules = {n: (m.down, m.up, m.scale * m.rank) for n, m in src.modules.items()}
    for namespace in ("comfyui", "diffusers"):
        out = save_lora(tmp_path / f"ours_{namespace}.safetensors", modules, namespace=namespace)
        base, merged, patched = _merged(qwen, out, strength=0.5)
        assert len(patched) == 24
        for name, m in src.modules.items():  # as trained: scale 4, times the strength
            k = f"diffusion_model.{name}.weight"
            torch.testing.assert_close(merged[k] - base[k], 0.5 * m.delta(), rtol=1e-4, atol=1e-5)


def test_flux_diffusers_layout_lands_on_fused_qkv_slices(pack, comfy, tmp_path):
    from glance_pack.glance_core.lora import read_lora
    flux = comfy_runtime.tiny_model("flux")
    h = 64
    path = lf.write(tmp_path / "flux_diffusers.safetensors", lf.flux_diffusers_tensors(hidden=h, seed=5, scale=1.0))
    lora = read_lora(path)
    assert lora.family == "flux.1-dev" and len(lora.modules) == 6
    base, merged, patched = _merged(flux, path)
    assert base["diffusion_model.single_blocks.0.linear1.weight"].shape[0] == 3 * h + 4 * h  # qkv + MLP in
    assert patched == {"diffusion_model.double_blocks.0.img_attn.qkv.weight",
                       "diffusion_model.single_blocks.0.linear1.weight"}
    for blk, fused in (("transformer_blocks.0", "double_blocks.0.img_attn.qkv"),
                       ("single_transformer_blocks.0", "single_blocks.0.linear1")):
        k = f"diffusion_model.{fused}.weight"
        diff = merged[k] - base[k]
        for i, p in enumerate(("to_q", "to_k", "to_v")):
            torch.testing.assert_close(diff[i * h:(i + 1) * h], lora.modules[f"{blk}.attn.{p}"].delta(),
                                       rtol=1e-4, atol=1e-4)
        assert diff.shape[0] == 3 * h or diff[3 * h:].abs().max() == 0  # linear1's MLP rows untouched


def test_wrong_family_file_matches_no_layer(pack, qwen, tmp_path):
    from glance_pack.glance_core.errors import LoraMismatchError
    from glance_pack.glance_core.lora import check_matches, read_lora
    path = lf.write(tmp_path / "flux_kohya.safetensors", lf.kohya_tensors(["double_blocks.0.img_attn.qkv"]))
    lora = read_lora(path)
    layers = [k[len("diffusion_model."):-len(".weight")] for k in qwen.model.state_dict()
              if k.startswith("diffusion_model.") and k.endswith(".weight")]
    with pytest.raises(LoraMismatchError, match="matched 0 of 1 LoRA modules to layers of QwenImage"):
        check_matches(lora, layers, "QwenImage")
