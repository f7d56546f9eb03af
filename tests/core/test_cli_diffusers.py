"""`python -m glance_core generate / train` on a tiny FLUX pipeline folder, offline."""
import os
import subprocess
import sys

import pytest
from PIL import Image

import lora_files as lf
import tiny_pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glance_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return tiny_pipelines.save_tiny_flux(str(tmp_path_factory.mktemp("tiny_flux")))


def test_train_then_generate(flux_dir, tmp_path):
    img = Image.new("RGB", (320, 256), (200, 60, 40))
    img.paste((30, 90, 220), (80, 64, 240, 192))
    img.save(tmp_path / "ref.png")
    out = _cli("train", "--model", flux_dir, "--image", str(tmp_path / "ref.png"), "--caption", "a red fox",
               "--steps", "2", "--rank", "4", "--resolution", "320", "--out-dir", str(tmp_path), "--name", "cli")
    assert out.returncode == 0, out.stderr[-3000:]
    slow, fast = (str(tmp_path / f"cli_{p}.safetensors") for p in ("slow", "fast"))
    assert out.stdout.split() == [slow, fast]
    assert "Glance training" in out.stderr  # the progress bar
    gen = _cli("generate", "--model", flux_dir, "--slow", slow, "--fast", fast, "--prompt", "a blue fox",
               "--width", "256", "--height", "192", "--out", str(tmp_path / "fox.png"))
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "glance layout, flux.1-dev" in gen.stderr
    assert Image.open(tmp_path / "fox.png").size == (256, 192)
    again = _cli("train", "--model", flux_dir, "--image", str(tmp_path / "ref.png"), "--caption", "x", "--steps",
                 "1", "--rank", "4", "--resolution", "320", "--out-dir", str(tmp_path), "--name", "cli")
    assert again.returncode == 2 and "exists; choose another name or pass --overwrite" in again.stderr


def test_clear_errors(flux_dir, tmp_path):
    qwen = lf.write(tmp_path / "qwen.safetensors", lf.official_qwen_tensors(blocks=1))
    cases = [
        (["generate", "--model", str(tmp_path / "nope"), "--no-pair", "--prompt", "x"], "no such folder"),
        (["generate", "--model", str(tmp_path), "--no-pair", "--prompt", "x"], "not a diffusers pipeline folder"),
        (["generate", "--model", flux_dir, "--prompt", "x"], "give --slow and --fast"),
        (["generate", "--model", flux_dir, "--no-pair", "--prompt", "x", "--width", "250"],
         "--width 250: must be a positive multiple of 16"),
        (["generate", "--model", flux_dir, "--slow", str(qwen), "--fast", str(qwen), "--prompt", "x", "--width",
          "256", "--height", "256"], "--slow: qwen.safetensors is a qwen-image LoRA but --model is a flux.1-dev"),
        (["train", "--model", flux_dir, "--image", str(qwen), "--caption", "x"], "cannot read it as an image"),
    ]
    for args, msg in cases:
        out = _cli(*args)
        assert out.returncode == 2 and msg in out.stderr, (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr


def test_help_reads_like_a_manual():
    for cmd in ("generate", "train"):
        out = _cli(cmd, "--help")
        assert out.returncode == 0 and "example" in out.stdout and "--model" in out.stdout


def test_sd3_train_then_generate(tmp_path):
    # Every family on the command line: SD3 trains and samples through the same family module as the library.
    sd3_dir = tiny_pipelines.save_tiny_sd3(str(tmp_path / "tiny_sd3"))
    Image.new("RGB", (256, 256), (30, 160, 40)).save(tmp_path / "ref.png")
    out = _cli("train", "--model", sd3_dir, "--image", str(tmp_path / "ref.png"), "--caption", "a red fox",
               "--steps", "2", "--rank", "4", "--resolution", "256", "--out-dir", str(tmp_path), "--name", "sd3",
               "--seed", str(2 ** 64 - 1))
    assert out.returncode == 0, out.stderr[-3000:]
    slow, fast = (str(tmp_path / f"sd3_{p}.safetensors") for p in ("slow", "fast"))
    assert out.stdout.split() == [slow, fast]
    gen = _cli("generate", "--model", sd3_dir, "--slow", slow, "--fast", fast, "--prompt", "a blue fox",
               "--width", "256", "--height", "256", "--guidance", "2", "--out", str(tmp_path / "fox.png"))
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "glance layout, sd3" in gen.stderr
    assert Image.open(tmp_path / "fox.png").size == (256, 256)


def test_train_output_problems_are_found_before_the_pipeline_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = [(["--out-dir", str(tmp_path / "afile")], "--out-dir: " + str(tmp_path / "afile") + " is a file"),
             (["--out-dir", str(tmp_path), "--name", "n" * 250], "--name: 'nnn"),
             (["--out-dir", str(tmp_path), "--name", "a/b"], "--name: 'a/b'")]
    Image.new("RGB", (256, 256)).save(tmp_path / "ref.png")
    for extra, msg in cases:
        out = _cli("train", "--model", str(tmp_path / "no_pipeline_here"), "--image", str(tmp_path / "ref.png"),
                   "--caption", "x", *extra)
        assert out.returncode == 2 and msg in out.stderr, (extra, out.stderr[-2000:])
        assert "Traceback" not in out.stderr
