import json
import subprocess
import sys

import pytest
import torch

from glance_core.integrate import sample_glance_euler
from glance_core.schedule import build_schedule

ROOT = __file__.rsplit("/tests/", 1)[0]


def test_euler_is_exact_for_a_straight_flow():
    # If the model knows x0 exactly, consistent-mode Euler lands on x0 from any noise.
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    sched = build_schedule("flux", 256, 256)
    seen = []
    out = sample_glance_euler(lambda x, s: x0, noise, sched.steps,
                              callback=lambda d: seen.append((d["i"], d["phase"], d["sigma"])))
    torch.testing.assert_close(out, x0)
    assert [p for _, p, _ in seen] == ["slow"] * 5 + ["fast"] * 5
    assert [s for _, _, s in seen] == sched.sigmas[:-1]


def test_reference_mode_integrates_the_longer_official_path():
    # A model whose velocity is constant (v = noise - x0) travels exactly the summed sigma path.
    x0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)

    def model(x, s):
        return x - s.view(-1, 1, 1, 1) * (noise - x0)
    ref = build_schedule("qwen-image", 1024, 1024, mode="reference")
    out = sample_glance_euler(model, noise.clone(), ref.steps)
    assert out.mean().item() == pytest.approx(1 - 1.054, abs=1e-3)
    con = sample_glance_euler(model, noise.clone(), build_schedule("qwen-image", 1024, 1024).steps)
    assert con.abs().max().item() < 1e-6


def test_cli_schedule_prints_json():
    out = subprocess.run([sys.executable, "-m", "glance_core", "schedule", "--family", "qwen-image", "--width",
                          "1024", "--height", "1024"], cwd=ROOT, capture_output=True, text=True, check=True)
    d = json.loads(out.stdout)
    assert d["fast"]["timesteps"] == pytest.approx([886.7053, 745.0728, 562.9505, 320.0802, 20.0], abs=1e-3)
    assert d["mode"] == "consistent" and len(d["steps"]) == 10


def test_cli_errors_are_one_line():
    out = subprocess.run([sys.executable, "-m", "glance_core", "schedule", "--family", "flux", "--width", "1000"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "error: width 1000 must be a positive multiple of 16 px for FLUX.1-dev " \
                                 "(8x VAE, 2x2 patches)"
