"""Train the bundled teacher from scratch: `python -m glance_shapes.train_teacher` (about 15 min on 2 cores).

Plain flow matching on freshly rendered pictures (a new batch every step, sigma uniform in [0, 1], 10 % empty
captions), AdamW with warm-up and cosine decay, an EMA of the weights is what gets saved. Everything is seeded;
the same torch version and thread count reproduce the same file.
"""
import argparse
import json
import math
import os
import platform
import time

import torch

from glance_core.files import atomic_write, write_text
from glance_core.train import flow_matching_loss
from . import DEFAULT_CFG, data, judge
from .sampling import plain_steps, sample
from .teacher import WEIGHTS, Teacher, TeacherConfig, config_dict, sha256

DEFAULTS = dict(steps=6000, batch=32, lr=2e-3, warmup=300, ema=0.999, dropout=0.1, seed=0, threads=2)


def _log(line):
    print(line, flush=True)


def train(steps, batch, lr, warmup, ema, dropout, seed, threads, log=_log):
    """Train and return (EMA teacher, list of losses)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = Teacher(TeacherConfig())
    avg = Teacher(TeacherConfig())
    avg.load_state_dict(model.state_dict())
    avg.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    gen = torch.Generator().manual_seed(seed)
    losses, t0 = [], time.time()
    for i in range(steps):
        caps = data.random_captions(batch, gen)
        x0 = data.render(caps, gen) * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(batch, generator=gen)
        cond = model.cond(caps)
        drop = torch.rand(batch, generator=gen) < dropout
        cond[drop] = model.empty_like(cond)[drop]
        loss = flow_matching_loss(lambda xt, sg: model.velocity(xt, sg, cond), x0, noise, sigma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA with a warm-up, so the initial weights fade out quickly
            decay = min(ema, (i + 1) / (i + 10))
            for a, p in zip(avg.parameters(), model.parameters()):
                a.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if (i + 1) % 100 == 0 or i + 1 == steps:
            log(f"step {i + 1}/{steps}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  "
                f"{time.time() - t0:.0f} s")
    return avg.eval(), losses


def check(model, n=64):
    """Judge's accuracy of 50-step samples of n random captions, unguided and at the default guidance."""
    gen = torch.Generator().manual_seed(12345)
    caps = data.random_captions(n, gen)
    return {f"cfg {cfg:g}": judge.score(sample(model, caps, range(n), plain_steps(50), cfg=cfg), caps)
            for cfg in (1.0, DEFAULT_CFG)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m glance_shapes.train_teacher", description=__doc__)
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k, type=type(v), default=v, help=f"default {v}")
    p.add_argument("--out", default=WEIGHTS, help="weights file to write (default: the bundled one)")
    p.add_argument("--record", default=None, help="record JSON to write (default: beside --out as teacher.json)")
    a = p.parse_args(argv)
    settings = {k: getattr(a, k) for k in DEFAULTS}
    t0 = time.time()
    model, losses = train(**settings)
    minutes = (time.time() - t0) / 60
    acc = check(model)
    from safetensors.torch import save_file
    record_path = a.record or os.path.join(os.path.dirname(os.path.abspath(a.out)), "teacher.json")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(a.out, lambda tmp: save_file(state, tmp, metadata={"config": json.dumps(config_dict(model.config))}))
    record = {"config": config_dict(model.config), "sha256": sha256(a.out), "training": settings,
              "final_loss": sum(losses[-100:]) / len(losses[-100:]), "minutes": round(minutes, 1),
              "check_50_step_accuracy_64": acc, "torch": torch.__version__, "machine": platform.machine(),
              "command": "python -m glance_shapes.train_teacher " + " ".join(argv or [])}
    write_text(record_path, json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
