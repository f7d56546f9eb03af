import pytest
import torch

import comfy_runtime

FAMILIES = ["flux", "qwen-image", "sd3"]


@pytest.fixture(scope="module")
def models(comfy):
    return {f: comfy_runtime.tiny_model(f) for f in FAMILIES}


def _latent(family, h=16, w=16):
    shape = (1, 16, 1, h, w) if family == "qwen-image" else (1, 16, h, w)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_runs_through_comfyui(models, family):
    import comfy.model_sampling
    patcher = models[family]
    model = patcher.model
    assert isinstance(model.model_sampling, comfy.model_sampling.CONST)  # a flow-matching model
    cond = comfy_runtime.tiny_conditioning(family)[0]
    x = _latent(family)
    kw = {"c_crossattn": cond[0]}
    if "pooled_output" in cond[1]:
        kw["y"] = cond[1]["pooled_output"]
    if family == "flux":
        kw["guidance"] = torch.tensor([3.5])
    sigma = torch.tensor([0.9])
    with torch.no_grad():
        a = model.apply_model(x, sigma, **kw)
        b = model.apply_model(x, torch.tensor([0.3]), **kw)
    assert a.shape == x.shape and torch.isfinite(a).all(), (a.shape, a.isnan().sum())
    assert (a - b).abs().max() > 1e-4, (a - b).abs().max()  # the timestep reaches the network


@pytest.mark.parametrize("family,expect", [("flux", "flux.1-dev"), ("qwen-image", "qwen-image"), ("sd3", "sd3")])
def test_family_detection(pack, models, family, expect):
    from glance_pack.nodes.comfy_model import family_of, require_flow
    require_flow(models[family])
    assert family_of(models[family]) == expect
