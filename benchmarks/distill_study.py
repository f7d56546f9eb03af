"""Study: distil the teacher's guided 50-step path into a Glance pair, and measure what wins.

The pair learns to make each of the 10 Glance steps land where the teacher's own 50-step path is at the next
Glance sigma. Trajectories come from the teacher itself at the user's CFG (no real image). Per training item
(trajectory n, Glance step k from sigma_k to sigma_k+1) the input state x_k is either the path's own state
(`--target path`, off-policy) or the state the 10-step student itself reaches at sigma_k (`--target student`,
on-policy: rollouts refreshed every `--refresh` steps), and the target velocity is
(path(sigma_k+1) - x_k) / (sigma_k+1 - sigma_k): the step that lands exactly on the path.

Data (`--data`): `one` = the training caption with N seeds (the first is the reference sample's seed), `ref` =
the reference sample only (N = 1), `captions` = N random captions (none of the held-out ones) one seed each,
`mix` = `one` with every second trajectory under the empty caption.

Evaluation as benchmarks/bench_shapes.py: 64 held-out (caption, seed) pairs, PSNR to the teacher's 50-step
picture at the SAME guidance the trajectories used, caption accuracy by the judge. `--sample-cfg 1` with
`--cfg 3` is the "half the model calls" pair: distilled from guided paths, sampled unguided.

Every list-valued flag is swept (cartesian product); one JSON line per run is appended to `--out`.
    python benchmarks/distill_study.py --cfg 3 --trajectories 1 4 16 --target path student --out /tmp/s.jsonl
"""
import argparse
import itertools
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from glance_core import runtime  # noqa: E402
from glance_core.integrate import sample_glance_euler  # noqa: E402
from glance_shapes import DEFAULT_CAPTION, data, judge, teacher as teacher_mod  # noqa: E402
from glance_shapes.compare import fidelity  # noqa: E402
from glance_shapes.demo import held_out  # noqa: E402
from glance_core.families import TIMESTEP_LAYERS  # noqa: E402
from glance_shapes.glance import target_modules  # noqa: E402
from glance_shapes.sampling import glance_schedule, noise_for, plain_steps  # noqa: E402
from glance_core.train import lora_pair_params  # noqa: E402

SCHED = glance_schedule("consistent")
SIGMAS = [st.sigma for st in SCHED.steps] + [0.0]          # the 11 Glance sigmas, 1 .. 0
PHASE_OF = [st.phase for st in SCHED.steps]               # phase of Glance step k


def velocity_model(teacher, cond, cfg, adapters=None):
    """v(x, sigma [B]) of the teacher at guidance cfg; rows use the slow/fast adapter by their sigma."""
    def v(x, sigma):
        if not adapters:
            return teacher.guided_velocity(x, sigma, cond, cfg)
        out = torch.empty_like(x)
        slow = sigma > SCHED.boundary
        for phase, rows in (("slow", slow), ("fast", ~slow)):
            if rows.any():
                with runtime.active(adapters[phase], replace=True):
                    out[rows] = teacher.guided_velocity(x[rows], sigma[rows], cond[rows], cfg)
        return out
    return v


def states_along(teacher, cond, noise, steps, cfg, adapters=None):
    """x at every Glance sigma [11, N, 3, 32, 32] along Euler `steps` from `noise` (with grad off)."""
    got = {}
    v = velocity_model(teacher, cond, cfg, adapters)
    model = lambda x, s: x - s.reshape(-1, 1, 1, 1) * v(x, s.expand(x.shape[0]))  # noqa: E731 (x0 form)
    with torch.no_grad():
        last = sample_glance_euler(model, noise, steps, callback=lambda i: got.__setitem__(i["sigma"], i["x"]))
    got[0.0] = last
    return torch.stack([got[s] for s in SIGMAS]) if steps is SCHED.steps or len(steps) == 50 else last[None]


def training_data(kind, n, caption, held):
    """(cond [n, 4], seeds) of the training trajectories for a `--data` kind."""
    if kind == "ref":
        return teacher_mod.Teacher.cond([caption]), [0]
    seeds = [0] + [1000 + i for i in range(1, n)]  # held-out seeds are 1..64: never reused
    if kind == "captions":
        caps = [caption] + data.random_captions(n - 1, torch.Generator().manual_seed(5), exclude=held + [caption])
        return teacher_mod.Teacher.cond(caps), seeds
    cond = teacher_mod.Teacher.cond([caption] * n)
    if kind == "mix":
        cond[1::2] = teacher_mod.Teacher.empty_like(cond[1::2])
    return cond, seeds


ADALN = re.compile(r"(norm1|norm1_context|norm_out)\.linear$")  # adaLN modulation (`--modules ada`)


def adapted(teacher, which):
    """[(name, Linear)] for a `--modules` value: attn (the SD3 recipe's layers), time (the timestep embedder, as
    the pack's layers "timestep embedder"), ada (adaLN modulation), or names joined by + (attn+time)."""
    out = []
    for w in which.split("+"):
        if w == "attn":
            out += target_modules(teacher)
        elif w == "time":
            out += target_modules(teacher, TIMESTEP_LAYERS)
        elif w == "ada":
            out += [(n, m) for n, m in teacher.transformer.named_modules()
                    if isinstance(m, torch.nn.Linear) and ADALN.search(n)]
        else:
            raise SystemExit(f"--modules {which!r}: use attn, time, ada or names joined by +")
    return out


def new_pair(teacher, rank, seed, modules="attn"):
    """{"slow", "fast"}: fresh trainable run-time adapters on the chosen layers (alpha = 4 rank)."""
    gen = torch.Generator().manual_seed(seed)
    pair = {}
    for phase in ("slow", "fast"):
        a = runtime.Adapter(phase, trainable=True)
        for _, m in adapted(teacher, modules):
            a.add(m, *lora_pair_params((rank, m.in_features), (m.out_features, rank), rank, generator=gen), 4.0)
        pair[phase] = a
    return pair


def distil(teacher, r):
    """Train one pair for run settings r; returns (pair, seconds to make the trajectories, seconds training)."""
    t0 = time.perf_counter()
    cond, seeds = training_data(r["data"], r["trajectories"], r["caption"], r["held"])
    noise = noise_for(seeds)
    path = states_along(teacher, cond, noise, plain_steps(SCHED.base_steps), r["cfg"])   # [11, N, ...]
    t_paths = time.perf_counter() - t0
    pair = new_pair(teacher, r["rank"], r["seed"], r["modules"])
    params = pair["slow"].parameters() + pair["fast"].parameters()
    opt = torch.optim.AdamW(params, lr=r["lr"], weight_decay=0.01)
    gen = torch.Generator().manual_seed(r["seed"])
    sig = torch.tensor(SIGMAS)
    n = len(seeds)
    start = path
    t0 = time.perf_counter()
    for i in range(r["steps"]):
        if r["target"] == "student" and i % r["refresh"] == 0:  # on-policy: where the student itself gets to
            start = states_along(teacher, cond, noise, SCHED.steps, r["sample_cfg"], pair)
        idx = torch.randint(n, (r["batch"],), generator=gen)
        k = torch.randint(len(SCHED.steps), (r["batch"],), generator=gen)
        x = start[k, idx]
        ds = (sig[k + 1] - sig[k]).reshape(-1, 1, 1, 1)
        target = (path[k + 1, idx] - x) / ds
        pred = velocity_model(teacher, cond[idx], r["sample_cfg"], pair)(x, sig[k])
        err = (pred - target).pow(2)
        if r["weight"] == "state":  # error of the landing point (x-space) rather than of the velocity
            err = err * ds.pow(2) / ds.pow(2).mean()
        loss = err.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for a in pair.values():
        a.freeze()
    return pair, t_paths, time.perf_counter() - t0


def evaluate(teacher, captions, seeds, reference, cfg, pair=None, steps=SCHED.steps):
    """(PSNR dB, caption accuracy) of 10-step pictures against the 50-step reference pictures."""
    cond = teacher_mod.Teacher.cond(captions)
    x = states_along(teacher, cond, noise_for(seeds), steps, cfg, pair)[-1]
    images = ((x + 1) / 2).clamp(0, 1)
    return fidelity(images, reference)[0], judge.score(images, captions)["all"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep = dict(nargs="+")
    ap.add_argument("--cfg", type=float, default=3.0, help="guidance of the trajectories and of the reference")
    ap.add_argument("--sample-cfg", type=float, default=None, help="guidance the pair samples with (default --cfg)")
    ap.add_argument("--data", choices=("one", "ref", "captions", "mix"), default=["one"], **sweep)
    ap.add_argument("--trajectories", type=int, default=[16], **sweep)
    ap.add_argument("--target", choices=("path", "student"), default=["path"], **sweep)
    ap.add_argument("--weight", choices=("velocity", "state"), default=["velocity"], **sweep)
    ap.add_argument("--steps", type=int, default=[200], **sweep, help="optimizer steps (both LoRAs at once)")
    ap.add_argument("--lr", type=float, default=[5e-4], **sweep)
    ap.add_argument("--rank", type=int, default=[16], **sweep)
    ap.add_argument("--modules", default=["attn"], **sweep,
                    help="layers adapted: attn (the SD3 recipe), time (timestep embedder), ada (adaLN), or a+b")
    ap.add_argument("--batch", type=int, default=16, help="training items (trajectory, Glance step) per step")
    ap.add_argument("--refresh", type=int, default=25, help="on-policy: re-roll the student every this many steps")
    ap.add_argument("--samples", type=int, default=64, help="held-out (caption, seed) pairs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default="/tmp", help="folder for the cached 50-step reference pictures")
    ap.add_argument("--out", required=True, help="JSON-lines file the runs are appended to")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    sample_cfg = a.cfg if a.sample_cfg is None else a.sample_cfg
    teacher = teacher_mod.load()
    caption = data.parse_caption(DEFAULT_CAPTION)
    captions, seeds = held_out(caption, 0, a.samples)
    cond = teacher_mod.Teacher.cond(captions)
    cache = os.path.join(a.cache, f"distill_study_ref_cfg{a.cfg:g}_n{a.samples}.pt")
    if os.path.exists(cache):  # the 50-step reference and the baselines depend only on cfg and samples
        ref, base = torch.load(cache)
    else:
        t0 = time.perf_counter()
        ref = ((states_along(teacher, cond, noise_for(seeds), plain_steps(50), a.cfg)[-1] + 1) / 2).clamp(0, 1)
        base = {"cfg": a.cfg, "samples": a.samples, "s_50_steps": time.perf_counter() - t0,
                "reference_accuracy": judge.score(ref, captions)["all"],
                "plain10": evaluate(teacher, captions, seeds, ref, a.cfg, steps=plain_steps(10)),
                "glance10": evaluate(teacher, captions, seeds, ref, a.cfg)}
        torch.save((ref, base), cache)
    if sample_cfg != a.cfg and "glance10_at_sample_cfg" not in base:
        base["glance10_at_sample_cfg"] = evaluate(teacher, captions, seeds, ref, sample_cfg)
        base["plain10_at_sample_cfg"] = evaluate(teacher, captions, seeds, ref, sample_cfg, steps=plain_steps(10))
    print(json.dumps(base))
    names = ("data", "trajectories", "target", "weight", "steps", "lr", "rank", "modules")
    for combo in itertools.product(*(getattr(a, n) for n in names)):
        r = dict(zip(names, combo), cfg=a.cfg, sample_cfg=sample_cfg, batch=a.batch, refresh=a.refresh,
                 caption=caption, held=list(captions), seed=0)
        if r["data"] == "ref" and r["trajectories"] != 1:
            continue
        pair, t_paths, t_train = distil(teacher, r)
        psnr, acc = evaluate(teacher, captions, seeds, ref, sample_cfg, pair)
        row = {k: r[k] for k in names + ("cfg", "sample_cfg", "batch", "refresh")}
        row.update(psnr=psnr, accuracy=acc, seconds_trajectories=t_paths, seconds_training=t_train,
                   baselines=base, command="python benchmarks/distill_study.py " + " ".join(
                       argv if argv is not None else sys.argv[1:]))
        print(f"{psnr:6.2f} dB acc {acc:.1%}  train {t_train:5.1f}s paths {t_paths:4.1f}s  "
              + " ".join(f"{k}={row[k]}" for k in names), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
