"""A Glance pair under ComfyUI's own torch.compile path (set_torch_compile_wrapper, what TorchCompileModel
does), inductor on CPU, tiny Qwen-Image: right in every compile order, no graph break, no recompile."""
import os

import pytest
import torch

import comfy_runtime
import lora_files as lf

FILES = {"a": ("compile_a_slow.safetensors", "compile_a_fast.safetensors", 11),
         "b": ("compile_b_slow.safetensors", "compile_b_fast.safetensors", 21)}


@pytest.fixture(scope="module")
def setup(pack):
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.qwen_image.model as qwen
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from glance_pack.nodes.loader_node import load_pair
    from glance_pack.nodes.pair import pair_of
    from glance_pack.nodes.sampler_node import GlanceSampler

    comfy.utils.PROGRESS_BAR_ENABLED = False
    # ComfyUI's CPU attention (sub-quadratic) asks psutil for free memory: a graph break of ComfyUI's own
    # (GPUs use the PyTorch attention). Use that one here so fullgraph=True tests the pack alone.
    saved_attention = qwen.optimized_attention_masked
    qwen.optimized_attention_masked = attention.attention_pytorch
    d = comfy_runtime.loras_dir()
    for slow, fast, seed in FILES.values():
        for name, s in ((slow, seed), (fast, seed + 1)):
            lf.write(os.path.join(d, name),
                     lf.official_qwen_tensors(blocks=2, rank=4, dim=32, mlp=128, mod=192, seed=s))
    base = comfy_runtime.tiny_model("qwen-image", seed=5)
    cond = comfy_runtime.tiny_conditioning("qwen-image")
    latent = {"samples": torch.zeros(1, 16, 1, 8, 8)}

    def glance(model):
        return GlanceSampler.execute(model=model, positive=cond, negative=cond, latent_image=latent, seed=3,
                                     cfg=1.0, sampler_name="euler", mode="consistent", family="auto",
                                     base_steps=50, slow_steps=5, slow_stride=2,
                                     fast_steps=5).result[0]["samples"]

    def stock(model):
        x = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        sigmas = torch.linspace(1.0, 0.0, 5)
        return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(x, 3), 1.0,
                                          comfy.samplers.sampler_object("euler"), sigmas, cond, cond, x, seed=3,
                                          disable_pbar=True)

    def paired(model, which):
        slow, fast, _ = FILES[which]
        return load_pair(model, slow, fast, 1.0, 1.0, "as trained")[0]

    def compiled(model):
        m = model.clone()
        set_torch_compile_wrapper(model=m, backend="inductor", fullgraph=True)
        return m

    # Eager references, each on its own clone of the one base model.
    with torch.inference_mode():
        ref = {"base": stock(base), "a": glance(paired(base, "a")), "b": glance(paired(base, "b"))}
    assert (ref["a"] - ref["base"]).abs().max() > 1e-2 and (ref["a"] - ref["b"]).abs().max() > 1e-2
    yield dict(base=base, glance=glance, stock=stock, paired=paired, compiled=compiled, ref=ref, pair_of=pair_of)
    qwen.optimized_attention_masked = saved_attention


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_every_compile_order_zero_breaks_no_recompiles(setup):
    from torch._dynamo.utils import counters
    s = setup
    torch._dynamo.reset()
    counters.clear()
    cbase = s["compiled"](s["base"])                   # the usual order: compile the base model, then add Glance
    c_a = s["paired"](cbase, "a")
    c_b = s["paired"](cbase, "b")                      # a second pair on the same compiled base
    a_then_c = s["compiled"](s["paired"](s["base"], "a"))  # the other order: attach the pair, then compile
    with torch.inference_mode():
        _close(s["stock"](cbase), s["ref"]["base"])    # compiled without any pair first: the plain graph cached
        _close(s["glance"](c_a), s["ref"]["a"])        # ... must not be reused for the paired model
        _close(s["stock"](cbase), s["ref"]["base"])    # the unpaired clone after a paired run: still plain
        _close(s["glance"](c_b), s["ref"]["b"])
        _close(s["glance"](a_then_c), s["ref"]["a"])
        frames = dict(counters["frames"])
        # Steady state: more generations, phases, both pairs and the unpaired clone: nothing compiles again.
        _close(s["glance"](c_a), s["ref"]["a"])
        _close(s["glance"](c_b), s["ref"]["b"])
        _close(s["stock"](cbase), s["ref"]["base"])
        _close(s["glance"](a_then_c), s["ref"]["a"])
    assert dict(counters["frames"]) == frames, "recompiled across generations/phases/pairs"
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # Two graphs: the plain model and the model with branches (Slow and Fast share it: tensors, not code).
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_recompile_after_unloading_keeps_the_pair(setup):
    import comfy.model_management as mm
    s = setup
    cbase = s["compiled"](s["base"])
    c_a = s["paired"](cbase, "a")
    with torch.inference_mode():
        _close(s["glance"](c_a), s["ref"]["a"])
        mm.unload_all_models()                          # drops the pair's device copies (ON_DETACH)
        assert all(a._prepared == (None, None) for a in s["pair_of"](c_a).adapters.values())
        torch._dynamo.reset()                           # and every compiled graph: compiled afresh
        _close(s["glance"](c_a), s["ref"]["a"])
        _close(s["stock"](cbase), s["ref"]["base"])
