"""Procedural 32x32 pictures of one shape: shape x colour x position x background, and their captions.

Images are float tensors [B, 3, 32, 32] in [0, 1]; the teacher sees them as 2x - 1. Within one caption the
pictures vary in size, exact position and slight colour, so the teacher has a real distribution to sample.
"""
import itertools
import math
from dataclasses import dataclass

import torch

from glance_core.errors import GlanceError

SIZE = 32
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.2, 0.85), "cyan": (0.1, 0.8, 0.85)}
POSITIONS = {"top-left": (10.0, 10.0), "top-right": (22.0, 10.0), "centre": (16.0, 16.0),
             "bottom-left": (10.0, 22.0), "bottom-right": (22.0, 22.0)}  # (x, y) pixel centres
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "white": (0.95, 0.95, 0.95)}
SLOTS = (("shape", SHAPES), ("colour", tuple(COLOURS)), ("position", tuple(POSITIONS)),
         ("background", tuple(BACKGROUNDS)))
RADIUS = (7.0, 8.5)   # half-extent range in pixels
JITTER = 1.5          # position jitter in pixels (each axis)
COLOUR_JITTER = 0.04  # per-channel colour jitter


@dataclass(frozen=True)
class Caption:
    """One picture description, e.g. 'red circle top-left on white'."""
    shape: str
    colour: str
    position: str
    background: str

    def __str__(self):
        return f"{self.colour} {self.shape} {self.position} on {self.background}"

    @property
    def indices(self):
        """(shape, colour, position, background) as indices into each slot's vocabulary."""
        return tuple(vocab.index(getattr(self, slot)) for slot, vocab in SLOTS)


def all_captions():
    """Every caption, in a fixed order (4 x 6 x 5 x 3 = 360)."""
    return [Caption(s, c, p, b) for s, c, p, b in itertools.product(*(v for _, v in SLOTS))]


def parse_caption(text):
    """Caption from 'colour shape position on background' (words in any order, 'on' optional)."""
    words = [w for w in str(text).lower().replace(",", " ").split() if w != "on"]
    found = {}
    for w in words:
        slot = next((s for s, vocab in SLOTS if w in vocab), None)
        if slot is None or slot in found:
            raise GlanceError(f"caption {text!r}: {'unknown word' if slot is None else 'second ' + slot} {w!r}; "
                              "write 'colour shape position on background' from: " + "; ".join(
                                  f"{s}: {', '.join(v)}" for s, v in SLOTS))
        found[slot] = w
    missing = [s for s, _ in SLOTS if s not in found]
    if missing:
        raise GlanceError(f"caption {text!r} lacks a {' and a '.join(missing)}; e.g. 'red circle top-left on white'")
    return Caption(**found)


def shape_distance(shape, dx, dy, r):
    """Signed distance in pixels (negative inside) of points (dx, dy) from a shape of half-extent r at 0."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
    if shape == "triangle":  # apex up (y grows downwards); inradius 0.6 r, so the centroid is the centre
        h = 0.6 * r
        c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
        return torch.maximum(torch.maximum(dy, c * dx - s * dy), -c * dx - s * dy) - h
    if shape == "cross":
        arm, half = r, 0.35 * r
        return torch.minimum(torch.maximum(dx.abs() - arm, dy.abs() - half),
                             torch.maximum(dx.abs() - half, dy.abs() - arm))
    raise GlanceError(f"unknown shape {shape!r}")


def render(captions, generator=None):
    """Pictures [B, 3, 32, 32] in [0, 1] of the given captions, anti-aliased, with random size/offset/tint."""
    n = len(captions)
    g = generator
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * torch.rand(n, generator=g)
    offset = (torch.rand(n, 2, generator=g) * 2 - 1) * JITTER
    tint = (torch.rand(n, 2, 3, generator=g) * 2 - 1) * COLOUR_JITTER
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    out = torch.empty(n, 3, SIZE, SIZE)
    for i, cap in enumerate(captions):
        cx, cy = POSITIONS[cap.position]
        d = shape_distance(cap.shape, xs - cx - offset[i, 0], ys - cy - offset[i, 1], radius[i])
        alpha = (0.5 - d).clamp(0, 1)  # one-pixel linear edge: anti-aliasing from the distance
        bg = (torch.tensor(BACKGROUNDS[cap.background]) + tint[i, 0]).clamp(0, 1)
        fg = (torch.tensor(COLOURS[cap.colour]) + tint[i, 1]).clamp(0, 1)
        out[i] = bg[:, None, None] * (1 - alpha) + fg[:, None, None] * alpha
    return out


def random_captions(n, generator=None, exclude=()):
    """n captions drawn uniformly (with replacement) from all captions except `exclude`."""
    pool = [c for c in all_captions() if c not in set(exclude)]
    idx = torch.randint(len(pool), (n,), generator=generator)
    return [pool[i] for i in idx.tolist()]
