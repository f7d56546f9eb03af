"""`python -m glance_shapes demo`: train a Glance pair on ONE sample of the bundled teacher, then compare
50-step, plain 10-step and Glance 10-step pictures on captions the pair never saw."""
import os
import time

import torch

from glance_core.errors import GlanceError
from glance_core.files import atomic_write
from . import DEFAULT_CAPTION, DEFAULT_CFG, data, teacher as teacher_mod
from .compare import BASELINE, GLANCE_10, PLAIN_10, measure
from .glance import train_pair
from .grid import comparison_grid


def check_args(caption, seed, steps, samples, out, cfg=DEFAULT_CFG):
    """Validate the demo's settings; returns the parsed Caption. Raises GlanceError naming the bad flag."""
    try:
        cap = data.parse_caption(caption)
    except GlanceError as e:
        raise GlanceError(f"--caption: {e}") from None
    if not 0 <= seed < 2 ** 63:
        raise GlanceError(f"--seed {seed}: must be in 0 .. 2^63-1")
    if not 1 <= steps <= 10000:
        raise GlanceError(f"--steps {steps}: training steps per LoRA must be in 1 .. 10000 (the recipe uses 60)")
    if not 1 <= samples <= 64:
        raise GlanceError(f"--samples {samples}: held-out pictures must be in 1 .. 64")
    if not 1.0 <= cfg <= 20.0:
        raise GlanceError(f"--cfg {cfg}: guidance must be in 1 .. 20 (1: none)")
    if not out.lower().endswith(".png"):
        raise GlanceError(f"--out {out}: the grid is written as PNG; give a .png path")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise GlanceError(f"--out {out}: folder {folder} does not exist")
    return cap


def held_out(caption, seed, n):
    """n (caption, seed) pairs for evaluation: captions other than the training one, seeds other than its seed."""
    gen = torch.Generator().manual_seed(seed + 7919)
    captions = data.random_captions(n, gen, exclude=[caption])
    return captions, [seed + 1 + i for i in range(n)]


def run(caption=DEFAULT_CAPTION, seed=0, steps=60, samples=8, out="glance_demo.png", objective="flow-matching",
        cfg=DEFAULT_CFG, progress=True, log=print):
    """Run the demo; returns the measured rows (dicts) after writing the grid PNG to `out`."""
    from tqdm.auto import tqdm
    cap = check_args(caption, seed, steps, samples, out, cfg)
    t_start = time.perf_counter()
    model = teacher_mod.load()
    log(f"teacher: {teacher_mod.WEIGHTS} (sha256 checked)")
    log(f"training the pair on one sample: '{cap}', seed {seed}, {steps} steps per LoRA ({objective})")
    bar = {}

    def on_step(phase, i, loss):
        if bar.get("phase") != phase:  # one bar per LoRA, opened when its training starts
            if bar:
                bar["bar"].close()
            bar.update(phase=phase, bar=tqdm(total=steps, desc=f"{phase} LoRA", disable=not progress))
        bar["bar"].update(1)
        bar["bar"].set_postfix(loss=f"{loss:.4f}")
    try:
        pair, losses, sample = train_pair(model, cap, seed, objective=objective, steps=steps, cfg=cfg,
                                          on_step=on_step)
    finally:
        if bar:
            bar["bar"].close()
    captions, seeds = held_out(cap, seed, samples)
    log(f"rendering {samples} held-out captions x 3 ways")
    variants = (BASELINE, PLAIN_10, GLANCE_10)
    # The demo's one pair fills the Glance column, whichever objective trained it.
    rows, pictures = measure(model, variants, captions, seeds, {GLANCE_10.pair: pair}, cfg=cfg)
    grid = comparison_grid([(v.label, pictures[v.label]) for v in variants], captions,
                           title=f"Glance on the bundled teacher: pair trained on ONE sample ({objective}, "
                                 f"{steps} steps per LoRA, cfg {cfg:g}); rows are captions it never saw",
                           training=(f"training sample: {cap}", sample[0]))
    atomic_write(out, lambda tmp: grid.save(tmp, format="PNG"))
    log("")
    log(f"{'':46s} {'calls':>5s} {'s/image':>8s} {'speed-up':>8s} {'PSNR dB':>8s} {'caption acc':>11s}")
    for r in rows:
        psnr = "ref" if r is rows[0] else f"{r['psnr']:.2f}"
        log(f"{r['label']:46s} {r['calls']:5d} {r['seconds']:8.4f} {r['speedup']:7.2f}x {psnr:>8s} "
            f"{r['accuracy']['all']:11.0%}")
    log(f"(PSNR against the 50-step picture of the same caption and noise; {samples} held-out captions; "
        f"cfg {cfg:g}, a call per guidance pass)")
    log(f"grid: {os.path.abspath(out)}   total {time.perf_counter() - t_start:.0f} s")
    return rows
