"""Glance on the bundled teacher: quality and speed on held-out captions, against the teacher's 50 steps.

A pair is trained on ONE sample (the teacher's 50-step picture of one caption and seed) with the paper's
flow-matching objective, a second pair with the trajectory objective (the teacher's own 50-step path at
the same sigmas), a third with glance_core.distill's objective (each Glance step lands on the teacher's
50-step path; DISTILL_TRAJECTORIES paths of the one caption, no picture, only the timestep embedder
adapted); then every variant renders the same held-out (caption, seed) pairs, none with the training
caption. Writes a markdown table, the raw numbers (JSON) and two grids; about 10 minutes on 2 cores.

    python benchmarks/bench_shapes.py                                   # writes into docs/
    python benchmarks/bench_shapes.py --samples 2 --repeats 1 --out-dir /tmp/bench   # quick check
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from glance_core.files import atomic_write, write_text  # noqa: E402
from glance_core import distill  # noqa: E402
from glance_shapes import (DEFAULT_CAPTION, DEFAULT_CFG, DISTILL_LAYERS, DISTILL_LR, DISTILL_STEPS,  # noqa: E402
                           DISTILL_TRAJECTORIES, OBJECTIVES, data, teacher as teacher_mod)
from glance_shapes.compare import BASELINE, GLANCE_10, PLAIN_10, VARIANTS, measure  # noqa: E402
from glance_shapes.demo import held_out  # noqa: E402
from glance_shapes.glance import train_pair  # noqa: E402
from glance_shapes.grid import comparison_grid  # noqa: E402


def table(rows, train_seconds, steps=60, distill_steps=DISTILL_STEPS, trajectories=DISTILL_TRAJECTORIES,
          prompts=distill.CAPTION):
    head = ("| sampling | model calls | ms / image | speed-up vs 50 | PSNR to 50-step (dB) | MSE to 50-step | "
            "caption accuracy | shape | colour | position | background |")
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        a = r["accuracy"]
        psnr = "(reference)" if r is rows[0] else f"{r['psnr']:.2f}"
        mse = "0" if r is rows[0] else f"{r['mse']:.5f}"
        lines.append(f"| {r['label']} | {r['calls']} | {1000 * r['seconds']:.2f} | {r['speedup']:.2f}x | {psnr} | "
                     f"{mse} | {a['all']:.1%} | {a['shape']:.0%} | {a['colour']:.0%} | {a['position']:.0%} | "
                     f"{a['background']:.0%} |")
    lines.append("")
    lines.append(f"Pair training (both LoRAs, batch 1: {steps} steps each; distill {distill_steps} steps each on the "
                 f"timestep embedder, lr {DISTILL_LR:g}, including making its {trajectories} 50-step paths"
                 + (", every second on the empty prompt" if prompts == distill.MIX else ", all on the caption")
                 + "): " + ", ".join(
                     f"{k} {v:.1f} s" for k, v in train_seconds.items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64, help="held-out (caption, seed) pairs (default 64)")
    ap.add_argument("--caption", default=DEFAULT_CAPTION, help=f"training caption (default '{DEFAULT_CAPTION}')")
    ap.add_argument("--seed", type=int, default=0, help="training sample's seed (default 0)")
    ap.add_argument("--steps", type=int, default=60, help="training steps per LoRA (default 60)")
    ap.add_argument("--distill-steps", type=int, default=DISTILL_STEPS,
                    help=f"training steps per LoRA of the distilled pair (default {DISTILL_STEPS})")
    ap.add_argument("--trajectories", type=int, default=DISTILL_TRAJECTORIES,
                    help=f"50-step paths the distilled pair learns from (default {DISTILL_TRAJECTORIES})")
    ap.add_argument("--cfg", type=float, default=DEFAULT_CFG,
                    help=f"classifier-free guidance for every variant (default {DEFAULT_CFG:g}, the teacher's; "
                         "1: none); other values than the default add a _cfgN suffix to the output names")
    ap.add_argument("--repeats", type=int, default=3, help="timing: best of this many renders (default 3)")
    ap.add_argument("--grid-rows", type=int, default=8, help="held-out rows shown in the grids (default 8)")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "..", "docs"), help="where results go (default docs/)")
    a = ap.parse_args(argv)
    cap = data.parse_caption(a.caption)
    if min(a.samples, a.repeats, a.steps, a.distill_steps, a.trajectories) < 1:
        ap.error("--samples, --repeats, --steps, --distill-steps and --trajectories must be at least 1")
    if not 1.0 <= a.cfg <= 20.0:
        ap.error("--cfg must be in 1 .. 20")
    suffix = "" if a.cfg == DEFAULT_CFG else f"_cfg{a.cfg:g}"
    model = teacher_mod.load()
    pairs, seconds = {}, {}
    # Under guidance every second path is on the empty prompt; unguided those would be pictures of nothing asked for.
    prompts = distill.MIX if a.cfg > 1 else distill.CAPTION
    for objective in OBJECTIVES:  # the same caption and seed (distill: that seed's path is its first)
        t0 = time.perf_counter()
        kw = dict(steps=a.steps)
        if objective == "distill":  # the best distillation settings found (glance_shapes.DISTILL_*)
            kw = dict(steps=a.distill_steps, lr=DISTILL_LR, layers=DISTILL_LAYERS, trajectories=a.trajectories,
                      prompts=prompts)
        pairs[objective], _, sample = train_pair(model, cap, a.seed, objective=objective, cfg=a.cfg, **kw)
        seconds[objective] = time.perf_counter() - t0
    captions, seeds = held_out(cap, a.seed, a.samples)
    assert cap not in captions
    rows, pictures = measure(model, VARIANTS, captions, seeds, pairs, repeats=a.repeats, cfg=a.cfg)

    os.makedirs(a.out_dir, exist_ok=True)
    n = min(a.grid_rows, a.samples)
    training = (f"training sample: {cap}", sample[0])
    grids = {f"shapes_grid{suffix}.png": (BASELINE, PLAIN_10, GLANCE_10), f"shapes_grid_all{suffix}.png": VARIANTS}
    for name, variants in grids.items():
        img = comparison_grid([(v.label, pictures[v.label][:n]) for v in variants], captions[:n],
                              title=f"held-out captions (the pair saw only the training sample), seeds {seeds[0]} to "
                                    f"{seeds[n - 1]}, cfg {a.cfg:g}",
                              training=training)
        atomic_write(os.path.join(a.out_dir, name), lambda tmp, img=img: img.save(tmp, format="PNG"))
    cmd = "python benchmarks/bench_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    when = datetime.date.today().isoformat()
    md = (f"Measured {when} with `{cmd.strip()}` on {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; cfg {a.cfg:g}; training sample '{cap}' seed {a.seed}; {a.samples} held-out "
          f"(caption, seed) pairs; time = best of {a.repeats} renders of the whole batch, per image.\n\n"
          + table(rows, seconds, a.steps, a.distill_steps, a.trajectories, prompts) + "\n")
    result = {"date": when, "command": cmd.strip(), "caption": str(cap), "seed": a.seed, "samples": a.samples,
              "cfg": a.cfg,
              "held_out": [[str(c), s] for c, s in zip(captions, seeds)], "rows": rows,
              "train_seconds": seconds, "distill": {"steps": a.distill_steps, "trajectories": a.trajectories,
                                                    "lr": DISTILL_LR, "layers": DISTILL_LAYERS}}
    write_text(os.path.join(a.out_dir, f"shapes_benchmark{suffix}.md"), md)
    write_text(os.path.join(a.out_dir, f"shapes_benchmark{suffix}.json"), json.dumps(result, indent=2) + "\n")
    print(md)
    return result


if __name__ == "__main__":
    main()
