"""The loss curve of a training run as a ComfyUI IMAGE (drawn with PIL: no plotting dependency)."""
import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {"slow": (66, 135, 245), "fast": (245, 130, 48)}


def loss_curve_image(losses, width=640, height=360):
    """IMAGE [1, H, W, 3] in [0, 1] with one line per phase: loss per step, log-scaled."""
    img = Image.new("RGB", (width, height), (250, 250, 250))
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 56, width - 16, 28, height - 36
    d.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    values = [v for vs in losses.values() for v in vs if v > 0]
    if values:
        lo, hi = np.log10(min(values)), np.log10(max(values))
        hi = hi if hi > lo else lo + 1.0
        n = max(len(vs) for vs in losses.values())
        for k, (phase, vs) in enumerate(losses.items()):
            pts = [(left + (right - left) * (i / max(1, n - 1)),
                    bottom - (bottom - top) * (np.log10(max(v, 1e-12)) - lo) / (hi - lo)) for i, v in enumerate(vs)]
            if len(pts) > 1:
                d.line(pts, fill=COLORS.get(phase, (0, 0, 0)), width=2)
            elif pts:
                d.ellipse([pts[0][0] - 3, pts[0][1] - 3, pts[0][0] + 3, pts[0][1] + 3], fill=COLORS.get(phase))
            d.text((left + 8 + 150 * k, 8), f"{phase}: {vs[0]:.4f} -> {vs[-1]:.4f}", fill=COLORS.get(phase, (0, 0, 0)))
        d.text((4, top), f"{10 ** hi:.3g}", fill=(90, 90, 90))
        d.text((4, bottom - 10), f"{10 ** lo:.3g}", fill=(90, 90, 90))
        d.text((left, bottom + 8), f"step 1 .. {n}   (loss, log scale)", fill=(90, 90, 90))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]
