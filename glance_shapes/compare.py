"""The comparisons the demo and the benchmark render: which schedule, which adapters, measured how."""
import math
import time
from dataclasses import dataclass

import torch

from . import judge
from .sampling import glance_schedule, plain_steps, sample


@dataclass(frozen=True)
class Variant:
    """One way to sample: a schedule ("plain-N", "glance", "glance-reference") and which trained adapters."""
    label: str
    schedule: str
    pair: str = None        # training objective of the pair used, None: the bare teacher
    phases: tuple = ("slow", "fast")


BASELINE = Variant("teacher, 50 steps", "plain-50")
PLAIN_10 = Variant("teacher, 10 steps, plain schedule", "plain-10")
GLANCE_10 = Variant("Glance pair, 10 steps (consistent)", "glance", "flow-matching")
VARIANTS = (
    BASELINE,
    PLAIN_10,
    Variant("teacher, 10 steps, Glance schedule, no adapters", "glance"),
    GLANCE_10,
    Variant("Glance pair, 10 steps (reference)", "glance-reference", "flow-matching"),
    Variant("slow LoRA only (consistent)", "glance", "flow-matching", ("slow",)),
    Variant("fast LoRA only (consistent)", "glance", "flow-matching", ("fast",)),
    Variant("trajectory-target pair, 10 steps (consistent)", "glance", "trajectory"),
    Variant("trajectory-target pair, 10 steps (reference)", "glance-reference", "trajectory"),
    Variant("distilled pair (timestep embedder, 50-step paths), 10 steps (consistent)", "glance", "distill"),
    Variant("distilled fast LoRA only (timestep embedder, consistent)", "glance", "distill", ("fast",)),
)


def steps_of(schedule):
    """Integrator steps and the phase boundary (sigma) for a variant's schedule name."""
    if schedule.startswith("plain-"):
        return plain_steps(int(schedule[len("plain-"):])), None
    sched = glance_schedule("reference" if schedule == "glance-reference" else "consistent")
    return sched.steps, sched.boundary


def render(teacher, variant, captions, seeds, pairs=None, cfg=1.0):
    """(pictures [B, 3, 32, 32] in [0, 1], seconds per picture, model calls per picture) for one variant
    (with guidance, a call is counted per CFG pass, as the paper counts 10 x 2).

    `pairs`: {objective: {"slow": Adapter, "fast": Adapter}} as trained by `glance.train_pair`.
    """
    steps, boundary = steps_of(variant.schedule)
    adapters = None
    if variant.pair is not None:
        trained = pairs[variant.pair]
        adapters = {p: trained[p] for p in variant.phases}
    t0 = time.perf_counter()
    images = sample(teacher, captions, seeds, steps, adapters, boundary, cfg)
    return images, (time.perf_counter() - t0) / len(captions), len(steps) * (1 if cfg == 1.0 else 2)


def fidelity(images, reference):
    """(mean PSNR in dB, mean MSE) of pictures in [0, 1] against reference pictures, per picture then averaged."""
    mse = (images - reference).pow(2).flatten(1).mean(1)
    psnr = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return float(psnr.mean()), float(mse.mean())


def measure(teacher, variants, captions, seeds, pairs=None, repeats=1, cfg=1.0):
    """One row per variant: label, calls, seconds per image (best of `repeats`), ratio to the first variant's
    time, PSNR/MSE to the first variant's pictures, caption accuracy; plus the pictures by label."""
    rows, pictures = [], {}
    for v in variants:
        best = math.inf
        for _ in range(repeats):
            images, seconds, calls = render(teacher, v, captions, seeds, pairs, cfg)
            best = min(best, seconds)
        pictures[v.label] = images
        rows.append(dict(label=v.label, calls=calls, seconds=best, accuracy=judge.score(images, captions)))
    ref = pictures[variants[0].label]
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        r["psnr"], r["mse"] = fidelity(pictures[r["label"]], ref)
    return rows, pictures
