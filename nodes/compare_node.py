"""GlanceSamplingTimer and GlanceCompareGrid: render one prompt several ways and see the difference.

The timer wraps a MODEL so that every sampling run made with it records its wall time (the sampler loop
only, after the model is loaded, ended by a device sync). The grid node waits for the images, so those runs
have finished when it reads the times; it computes PSNR and SSIM of each candidate to the reference picture
and draws the labelled grid.
"""
import math
import time
import uuid

import numpy as np
import torch
import torch.nn.functional as F
from comfy_api.latest import io
from PIL import Image, ImageDraw, ImageFont

from ..glance_core.errors import GlanceError

_TIMER_KEY = "glance_sampling_timer"   # model_options entry holding the timer's id (a string survives clones)
_SECONDS = {}                          # timer id -> seconds of its latest sampling run
CELL = 384                             # pictures are shown at this height (nearest-neighbour for small ones)


def psnr(a, b):
    """PSNR in dB of an image [H, W, C] in [0, 1] against a reference of the same shape (inf when equal)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a, b):
    """Mean SSIM of two images [H, W, C] in [0, 1]: 11x11 gaussian window (sigma 1.5), per channel, averaged."""
    x, y = (t.double().permute(2, 0, 1)[None] for t in (a, b))  # [1, C, H, W]; float64: E[x^2] - mu^2 is exact enough
    c = x.shape[1]
    size = min(11, x.shape[2], x.shape[3])
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(c, 1, size, size)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x ** 2
    syy = F.conv2d(y * y, w, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(m.mean())


def seconds_of(model):
    """Seconds of the latest sampling run made with a timed MODEL, or None (not timed, or not run yet)."""
    if model is None:
        return None
    return _SECONDS.get(model.model_options.get(_TIMER_KEY))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GlanceSamplingTimer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GlanceSamplingTimer",
            display_name="Glance Sampling Timer",
            category="sampling/glance",
            description="Passes the model through; every sampling run made with it records its wall time "
                        "(the sampling loop after the model is loaded). Connect the same output to Glance "
                        "Compare Grid to print the time under that column.",
            inputs=[io.Model.Input("model", tooltip="The model a sampler will use; place this node right "
                                                    "before the sampler (after LoRA and patch nodes).")],
            outputs=[io.Model.Output(tooltip="The same model, timed.")],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        import comfy.patcher_extension as ext
        timer = uuid.uuid4().hex
        out = model.clone()
        out.model_options[_TIMER_KEY] = timer

        def wrapper(executor, *args, **kwargs):
            _sync()
            t0 = time.perf_counter()
            result = executor(*args, **kwargs)
            _sync()
            _SECONDS[timer] = time.perf_counter() - t0
            return result
        out.add_wrapper_with_key(ext.WrappersMP.SAMPLER_SAMPLE, _TIMER_KEY, wrapper)
        return io.NodeOutput(out)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def _first(image, name):
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
        raise GlanceError(f"{name}: expected an IMAGE batch [B, H, W, 3], got "
                          f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    return image[0, ..., :3].clamp(0, 1).cpu()


def compare_grid(columns):
    """PIL grid and metric rows from columns [(label, image [H, W, 3] in [0, 1], seconds or None)]; the first
    column is the reference the others are scored against (PSNR dB, SSIM)."""
    ref = columns[0][1]
    rows = []
    for k, (label, img, secs) in enumerate(columns):
        row = {"label": label, "seconds": secs}
        if k:
            row.update(psnr=psnr(img, ref), ssim=ssim(img, ref))
        rows.append(row)
    h, w = ref.shape[:2]
    scale = max(1, CELL // h) if h < CELL else 1
    cw, ch = w * scale, h * scale
    pad, band = 12, 84
    canvas = Image.new("RGB", (pad + len(columns) * (cw + pad), band + ch + pad), (255, 255, 255))
    draw, big, small = ImageDraw.Draw(canvas), _font(18), _font(14)
    for k, ((label, img, _), row) in enumerate(zip(columns, rows)):
        x = pad + k * (cw + pad)
        tile = Image.fromarray((img.numpy() * 255).round().astype(np.uint8))
        canvas.paste(tile.resize((cw, ch), Image.NEAREST) if scale > 1 else tile, (x, band))
        draw.text((x, 6), label, fill=(0, 0, 0), font=big)
        secs = "time: not measured" if row["seconds"] is None else f"time: {row['seconds']:.2f} s"
        draw.text((x, 32), secs, fill=(60, 60, 60), font=small)
        score = "(reference)" if k == 0 else \
            f"PSNR {row['psnr']:.2f} dB   SSIM {row['ssim']:.4f}".replace("inf", "identical ")
        draw.text((x, 54), score, fill=(60, 60, 60), font=small)
    return canvas, rows


def report(rows):
    """One line per column: label, time, PSNR and SSIM to the reference."""
    lines = []
    for k, r in enumerate(rows):
        t = "not measured" if r["seconds"] is None else f"{r['seconds']:.2f} s"
        score = "reference" if k == 0 else f"PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}"
        speed = ""
        if k and r["seconds"] and rows[0]["seconds"]:
            speed = f", {rows[0]['seconds'] / r['seconds']:.2f}x faster than {rows[0]['label']}"
        lines.append(f"{r['label']}: {t}{speed}; {score}")
    return "\n".join(lines)


class GlanceCompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        def column(key, label, what):
            return [
                io.Image.Input(f"image_{key}", tooltip=f"The {what} picture (the first of its batch is shown)."),
                io.String.Input(f"label_{key}", default=label, tooltip=f"Caption above the {what} column."),
                io.Model.Input(f"timer_{key}", optional=True,
                               tooltip=f"The Glance Sampling Timer output the {what} sampler used: its "
                                       "sampling time is printed under the label."),
            ]
        return io.Schema(
            node_id="GlanceCompareGrid",
            display_name="Glance Compare Grid",
            category="sampling/glance",
            description="Side by side: the reference picture (e.g. 50 steps) and two candidates (plain 10 "
                        "steps, Glance 10 steps) with labels, sampling times, and each candidate's PSNR and "
                        "SSIM to the reference (same prompt and seed expected).",
            inputs=[*column("reference", "base model, 50 steps", "reference"),
                    *column("a", "plain, 10 steps", "first candidate"),
                    *column("b", "Glance, 10 steps", "second candidate")],
            outputs=[io.Image.Output(display_name="grid", tooltip="The labelled grid."),
                     io.String.Output(display_name="report", tooltip="Times, PSNR and SSIM as text.")],
        )

    @classmethod
    def execute(cls, image_reference, label_reference, image_a, label_a, image_b, label_b,
                timer_reference=None, timer_a=None, timer_b=None) -> io.NodeOutput:
        columns = [(label_reference, _first(image_reference, "image_reference"), seconds_of(timer_reference)),
                   (label_a, _first(image_a, "image_a"), seconds_of(timer_a)),
                   (label_b, _first(image_b, "image_b"), seconds_of(timer_b))]
        for name, (_, img, _) in zip(("image_a", "image_b"), columns[1:]):
            if img.shape != columns[0][1].shape:
                raise GlanceError(f"{name}: size {tuple(img.shape[:2])} differs from image_reference "
                                  f"{tuple(columns[0][1].shape[:2])}; render every column at the same size")
        grid, rows = compare_grid(columns)
        text = report(rows)
        out = torch.from_numpy(np.asarray(grid, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(out, text)
