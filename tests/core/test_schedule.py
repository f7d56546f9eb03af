import json
import math

import numpy as np
import pytest

from glance_core.errors import ScheduleError
from glance_core.families import FAMILIES, get_family
from glance_core.schedule import Schedule, build_schedule, glance_indices

OFFICIAL = {  # t = 1000 * sigma, from the official Glance scripts (1024 x 1024)
    "qwen-image": ([1000, 979.1915, 957.5157, 934.9171, 911.3354], [886.7053, 745.0728, 562.9505, 320.0802, 20.0]),
    "flux.1-dev": ([1000, 986.9786, 973.2042, 958.6094, 943.1188], [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]),
}


@pytest.mark.parametrize("family", sorted(OFFICIAL))
def test_official_timesteps_at_1024(family):
    s = build_schedule(family, 1024, 1024)
    slow, fast = OFFICIAL[family]
    assert [1000 * x for x in s.phase_sigmas("slow")] == pytest.approx(slow, abs=1e-3)
    assert [1000 * x for x in s.phase_sigmas("fast")] == pytest.approx(fast, abs=1e-3)
    assert s.slow_indices == (0, 2, 4, 6, 8) and s.fast_indices == (10, 20, 30, 40, 49)
    assert s.sigmas[-1] == 0.0 and len(s.sigmas) == 11


def test_other_resolution_is_computed_not_copied():
    s = build_schedule("qwen-image", 512, 512)
    # True 50-step points at 512^2 (the official scripts reuse the 1024^2 list instead).
    assert [1000 * x for x in s.phase_sigmas("slow")] == pytest.approx([1000, 975.9, 951.0, 925.2, 898.5], abs=0.06)
    assert s.phase_sigmas("slow") != build_schedule("qwen-image", 1024, 1024).phase_sigmas("slow")


def _diffusers_grid(family, n, width, height):
    from diffusers import FlowMatchEulerDiscreteScheduler
    fam = get_family(family)
    if family == "sd3":
        sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sch.set_timesteps(n)
        return sch.sigmas[:-1].double().numpy()
    if family == "qwen-image":
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
        sch = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                              max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                              use_dynamic_shifting=True, time_shift_type="exponential")
        mu = calculate_shift(fam.seq_len(width, height), 256, 8192, 0.5, 0.9)
    else:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        sch = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                              max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
        mu = calculate_shift(fam.seq_len(width, height), 256, 4096, 0.5, 1.15)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    return sch.sigmas[:-1].double().numpy()


@pytest.mark.parametrize("family", ["qwen-image", "flux.1-dev", "sd3"])
@pytest.mark.parametrize("size", [(1024, 1024), (512, 512), (768, 1344), (1328, 1328), (2048, 2048)])
@pytest.mark.parametrize("n", [50, 28, 10])
def test_base_grid_matches_diffusers_scheduler(family, size, n):
    ours = get_family(family).base_sigmas(n, *size)
    ref = _diffusers_grid(family, n, *size)
    assert len(ours) == n
    np.testing.assert_allclose(ours, ref, atol=2e-6)  # diffusers works in float32


@pytest.mark.parametrize("args,expect", [
    ((50, 5, 2, 5), ((0, 2, 4, 6, 8), (10, 20, 30, 40, 49))),
    ((50, 5, 1, 5), ((0, 1, 2, 3, 4), (5, 16, 27, 38, 49))),
    ((50, 5, 2, 10), ((0, 2, 4, 6, 8), (10, 14, 18, 23, 27, 32, 36, 41, 45, 49))),
    ((20, 2, 3, 1), ((0, 3), (19,))),
    ((12, 1, 1, 11), ((0,), tuple(range(1, 12)))),
])
def test_indices(args, expect):
    assert glance_indices(*args) == expect


def test_indices_properties_over_many_settings():
    for n in (5, 17, 50, 100):
        for slow in range(1, 6):
            for stride in (1, 2, 3):
                for fast in range(1, 12):
                    try:
                        s, f = glance_indices(n, slow, stride, fast)
                    except ScheduleError:
                        assert slow * stride > n - 1 or fast > n - slow * stride
                        continue
                    idx = s + f
                    assert all(a < b for a, b in zip(idx, idx[1:])), (n, slow, stride, fast, idx)
                    assert f[-1] == n - 1 and len(s) == slow and len(f) == fast
                    assert f[0] >= slow * stride or fast == 1


@pytest.mark.parametrize("kw,msg", [
    (dict(slow_steps=30), "fast phase would not reach the end"),
    (dict(fast_steps=41), "only 40 remain"),
    (dict(base_steps=1), "base_steps must be in 2..1000"),
    (dict(base_steps=5000), "base_steps must be in 2..1000"),
    (dict(slow_steps=0), "slow_steps must be in"),
    (dict(fast_steps=0), "fast_steps must be in"),
    (dict(slow_stride=0), "slow_stride must be in"),
    (dict(slow_steps=2.5), "whole number"),
    (dict(stepz=3), "unknown schedule settings"),
])
def test_bad_steps(kw, msg):
    with pytest.raises(ScheduleError, match=msg):
        build_schedule("qwen-image", 1024, 1024, **kw)


def test_bad_size_family_mode():
    with pytest.raises(ScheduleError, match="width 1000 must be a positive multiple of 16"):
        build_schedule("flux", 1000, 1024)
    with pytest.raises(ScheduleError, match="height 0 must be"):
        build_schedule("flux", 1024, 0)
    with pytest.raises(ScheduleError, match="unknown model family 'sdxl'"):
        build_schedule("sdxl", 1024, 1024)
    with pytest.raises(ScheduleError, match="unknown mode"):
        build_schedule("flux", 1024, 1024, mode="fast")


def test_consistent_mode_moves_between_listed_sigmas():
    s = build_schedule("qwen-image", 1024, 1024)
    for a, b in zip(s.steps, s.steps[1:]):
        assert a.sigma_from == a.sigma and a.sigma_to == b.sigma
    assert s.steps[-1].sigma_to == 0.0
    assert sum(st.sigma_from - st.sigma_to for st in s.steps) == pytest.approx(1.0)
    assert [st.phase for st in s.steps] == ["slow"] * 5 + ["fast"] * 5


def test_reference_mode_reproduces_official_two_stage_path():
    s = build_schedule("qwen-image", 1024, 1024, mode="reference")
    grid = get_family("qwen-image").base_sigmas(50, 1024, 1024)
    slow, fast = s.steps[:5], s.steps[5:]
    # Conditioning is at the listed sigmas in both modes.
    assert [st.sigma for st in s.steps] == build_schedule("qwen-image", 1024, 1024).sigmas[:-1]
    # Slow stage integrates 50-step grid indices 0 -> 5.
    assert [(st.sigma_from, st.sigma_to) for st in slow] == [(grid[i], grid[i + 1]) for i in range(5)]
    assert slow[-1].sigma_to == pytest.approx(0.946, abs=1e-3)
    # Fast stage restarts on a fresh 5-step grid at 1.0.
    assert [round(st.sigma_from, 4) for st in fast] == [1.0, 0.8367, 0.6326, 0.3701, 0.02]
    assert fast[-1].sigma_to == 0.0
    path = sum(st.sigma_from - st.sigma_to for st in s.steps)
    assert path == pytest.approx(1.054, abs=1e-3)


def test_boundary_and_phase_at():
    s = build_schedule("flux.1-dev", 1024, 1024)
    assert all(s.phase_at(st.sigma) == st.phase for st in s.steps)
    assert s.phase_sigmas("fast")[0] < s.boundary < s.phase_sigmas("slow")[-1]


def test_round_trip_through_json():
    s = build_schedule("sd3", 768, 1024, mode="reference", fast_steps=4)
    d = json.loads(s.to_json())
    assert d["slow"]["timesteps"][0] == 1000.0 and d["sigmas"][-1] == 0.0
    assert Schedule.from_dict(d) == s
    with pytest.raises(ScheduleError, match="malformed"):
        Schedule.from_dict({"family": "sd3"})


def test_explicit_family():
    base = [1 - i / 20 for i in range(20)] + [0.0]  # a ComfyUI SIGMAS list, closing 0 included
    s = build_schedule("explicit", 512, 512, base_sigmas=base, base_steps=99)  # base_steps comes from the list
    assert s.base_steps == 20 and s.slow_indices == (0, 2, 4, 6, 8)
    assert s.phase_sigmas("fast")[-1] == pytest.approx(base[19])
    with pytest.raises(ScheduleError, match="needs base_sigmas"):
        build_schedule("explicit")
    with pytest.raises(ScheduleError, match="strictly decreasing"):
        build_schedule("explicit", base_sigmas=[1.0, 0.5, 0.7, 0.1])
    with pytest.raises(ScheduleError, match="consistent' only"):
        build_schedule("explicit", mode="reference", base_sigmas=base)
    with pytest.raises(ScheduleError, match="only for family 'explicit'"):
        build_schedule("flux", base_sigmas=base)


def test_family_aliases_and_mu():
    assert get_family("Qwen").name == "qwen-image" and get_family("sd3.5").name == "sd3"
    assert get_family("qwen-image").mu(1024, 1024) == pytest.approx(0.693548, abs=1e-6)
    assert get_family("flux").mu(1024, 1024) == pytest.approx(1.15)
    assert set(FAMILIES) == {"qwen-image", "flux.1-dev", "sd3", "explicit"}
    assert math.isclose(get_family("qwen-image").base_sigmas(50, 1024, 1024)[-1], 0.02)
