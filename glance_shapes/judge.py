"""The judge: reads shape, colour, position and background back from a picture by template matching.

No training: background = median of the border, the shape = pixels far from it, colour = their median,
position = their centroid, shape = the best-overlapping template over a range of sizes. On the generator's
own pictures it is right on every attribute (tested), so a miss on a sample is the sample's fault.
"""
import torch

from .data import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZE, Caption, shape_distance

FOREGROUND = 0.25   # RGB distance from the background that counts as shape
MIN_PIXELS = 12     # fewer shape pixels than this: no shape was drawn
_SIZES = torch.linspace(5.0, 10.0, 11)


def _nearest(colour, palette):
    names = list(palette)
    ref = torch.tensor([palette[n] for n in names])
    return names[int((ref - colour).norm(dim=1).argmin())]


def read(images):
    """[B, 3, 32, 32] pictures in [0, 1] -> list of Caption (shape None when no shape is found)."""
    imgs = images.detach().float().clamp(0, 1).cpu()
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    border = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    out = []
    for img in imgs:
        bg = img[:, border].median(dim=1).values
        mask = (img - bg[:, None, None]).norm(dim=0) > FOREGROUND
        if int(mask.sum()) < MIN_PIXELS:
            out.append(Caption(None, None, None, _nearest(bg, BACKGROUNDS)))
            continue
        colour = img[:, mask].median(dim=1).values
        cx, cy = float(xs[mask].mean()), float(ys[mask].mean())
        position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
        m = mask.float()
        best, shape = -1.0, None
        for name in SHAPES:
            for r in _SIZES:
                t = (shape_distance(name, xs - cx, ys - cy, float(r)) < 0).float()
                iou = float((t * m).sum() / ((t + m) > 0).float().sum())
                if iou > best:
                    best, shape = iou, name
        out.append(Caption(shape, _nearest(colour, COLOURS), position, _nearest(bg, BACKGROUNDS)))
    return out


def score(images, captions):
    """Per-attribute and all-four accuracy (fractions) of pictures against the captions they were made for."""
    got = read(images)
    fields = ("shape", "colour", "position", "background")
    acc = {f: sum(getattr(g, f) == getattr(c, f) for g, c in zip(got, captions)) / len(captions) for f in fields}
    acc["all"] = sum(g == c for g, c in zip(got, captions)) / len(captions)
    return acc
