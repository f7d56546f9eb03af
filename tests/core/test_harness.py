"""The ComfyUI tests must not pass by skipping: without ComfyUI they skip locally and fail under CI=true."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(ci):
    env = dict(os.environ, COMFYUI_PATH="/nonexistent/ComfyUI", CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/with_comfy/test_tiny_models.py"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_missing_comfyui_skips_with_a_reason_locally():
    out = _run("false")
    assert out.returncode == 0, out.stdout[-2000:]
    assert "skipped" in out.stdout and "COMFYUI_PATH=/nonexistent/ComfyUI is not a ComfyUI checkout" in out.stdout
    assert "set COMFYUI_PATH to a ComfyUI checkout" in out.stdout


def test_missing_comfyui_fails_under_ci():
    out = _run("true")
    assert out.returncode == 1, out.stdout[-2000:]
    assert "CI=true: the ComfyUI tests must run" in out.stdout
