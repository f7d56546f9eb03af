"""The distillation objective: each Glance step learns to land where the base model's own N-step path is.

Trajectories come from the base model itself (no real image): Euler along its N-step sigma grid at the user's
CFG, from one noise per seed, with the states kept at every Glance sigma. A training item (trajectory n,
Glance step from sigma_from to sigma_to, conditioned at sigma) starts at path_n(sigma_from) and its target
velocity is (path_n(sigma_to) - path_n(sigma_from)) / (sigma_to - sigma_from): the Euler step that lands
exactly on the path. Sigmas are flow sigmas in [0, 1] (x_sigma = (1 - sigma) x0 + sigma noise), as in
`glance_core.train`; `velocity(x, sigma, dropped)` is the same callable `train_lora` takes. Plain torch.
"""
import math

import torch
import torch.nn.functional as F

from .errors import GlanceError

FLOW = "flow matching (paper)"
DISTILL = "distill 50-step path"
OBJECTIVES = (FLOW, DISTILL)
CLI_NAMES = {"flow": FLOW, "distill": DISTILL}  # --objective values
# What the trajectories are conditioned on: the caption only, or every second one on the empty prompt (the
# guided prediction of an empty-prompt path is the unconditional one), so the pair sees more than one picture.
CAPTION = "caption"
MIX = "caption and empty prompt"
PROMPTS = (CAPTION, MIX)
CLI_PROMPTS = {"caption": CAPTION, "mix": MIX}  # --trajectory-prompts values
MAX_TRAJECTORIES = 1024
SEED_SPACE = 2 ** 64


def check_settings(objective, trajectories, cfg, student_cfg, names=None, prompts=CAPTION):
    """Raise GlanceError naming the input/flag unless the objective's settings are usable; returns student cfg."""
    names = {"objective": "objective", "trajectories": "trajectories", "cfg": "distill_cfg",
             "student_cfg": "student_cfg", "prompts": "trajectory_prompts", **(names or {})}
    if objective not in OBJECTIVES:
        raise GlanceError(f"{names['objective']}: {objective!r} is not one of {', '.join(map(repr, OBJECTIVES))}")
    if prompts not in PROMPTS:
        raise GlanceError(f"{names['prompts']}: {prompts!r} is not one of {', '.join(map(repr, PROMPTS))}")
    if objective == FLOW:
        return None
    if not 1 <= int(trajectories) <= MAX_TRAJECTORIES:
        raise GlanceError(f"{names['trajectories']}: {trajectories} is out of range 1..{MAX_TRAJECTORIES}")
    for key, v in (("cfg", cfg), ("student_cfg", student_cfg)):
        if v is not None and (not math.isfinite(float(v)) or v < 0):
            raise GlanceError(f"{names[key]}: {v} must be a finite number >= 0")
    if cfg < 1:
        raise GlanceError(f"{names['cfg']}: {cfg} must be at least 1 (1 = no guidance)")
    student = cfg if student_cfg is None or student_cfg <= 0 else float(student_cfg)
    return student


def lr_decay(objective):
    """The lr schedule of an objective's training: the paper's constant lr, or (distill) a cosine decay to 0.

    A distillation step regresses one item of one path, so a constant lr leaves the pair wherever its last noisy
    steps took it (on the bundled teacher 300 / 600 / 1000 / 3000 steps gave 35.0 / 32.4 / 35.2 / 29.8 dB)."""
    return "cosine" if objective == DISTILL else "constant"


def trajectory_seeds(seed, n):
    """Seeds of n trajectories: the given seed first (its noise is the one sampling with that seed uses)."""
    return [(int(seed) + i) % SEED_SPACE for i in range(n)]


def empty_flags(n, prompts=CAPTION):
    """Per trajectory: True where it is conditioned on the empty prompt (MIX: every second, the first never)."""
    return [prompts == MIX and i % 2 == 1 for i in range(n)]


def seed_noise(shape, seed):
    """Noise [*shape] of one seed, drawn on the CPU in float32 like ComfyUI's prepare_noise."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed) % SEED_SPACE), dtype=torch.float32)


def guided(velocity, cfg, empty=False):
    """v(x, sigma) = uncond + cfg (cond - uncond) of a `velocity(x, sigma, dropped)` callable (cfg 1: cond only).

    empty: the path's own prompt is the empty one, so cond = uncond and the guided velocity is the unconditional."""
    if empty:
        return lambda x, s: velocity(x, s, True)
    if cfg == 1:
        return lambda x, s: velocity(x, s, False)

    def v(x, s):
        cond, uncond = velocity(x, s, False), velocity(x, s, True)
        return uncond + cfg * (cond - uncond)
    return v


def path_states(v, noise, base_sigmas, at, on_step=None):
    """States [len(at), *noise.shape] of the Euler path of v(x, sigma [B]) along base_sigmas (1 .. 0), at sigmas `at`.

    `base_sigmas` is descending and ends at 0 (appended if missing); an Euler path is linear in sigma within
    each step, so a state between two grid sigmas is interpolated exactly. `on_step(i, n)` after every step.
    """
    grid = [float(s) for s in base_sigmas]
    if grid[-1] != 0.0:
        grid.append(0.0)
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise GlanceError("base sigmas must be strictly decreasing")
    want = [float(s) for s in at]
    for s in want:
        if not grid[-1] <= s <= grid[0] + 1e-6:
            raise GlanceError(f"sigma {s:g} is outside the base path {grid[0]:g} .. 0")
    out = [None] * len(want)
    x = noise.clone()
    n = len(grid) - 1
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(grid, grid[1:])):
            for j, s in enumerate(want):
                if out[j] is None and s >= a - 1e-6:
                    out[j] = x.clone()
            d = v(x, torch.full((x.shape[0],), a, dtype=torch.float32, device=x.device)).to(x)
            for j, s in enumerate(want):
                if out[j] is None and s > b + 1e-6:  # strictly inside this step: exact on the Euler line
                    out[j] = x + (s - a) * d
            x = x + (b - a) * d
            if on_step is not None:
                on_step(i, n)
        for j in range(len(want)):
            if out[j] is None:
                out[j] = x.clone()
    return torch.stack(out)


def glance_sigmas(steps):
    """Every sigma a Glance schedule's steps start or end at (descending, ends at 0)."""
    return sorted({float(s) for st in steps for s in (st.sigma_from, st.sigma_to)}, reverse=True)


def make_trajectories(velocity, shape, seeds, base_sigmas, steps, cfg, on_step=None, device="cpu", prompts=CAPTION):
    """{"sigmas": Glance sigmas, "states": [len(sigmas), n, *shape[1:]] on CPU, "empty": [n] bools}: one base
    path per seed at cfg, conditioned on the caption (or, `prompts` MIX, every second on the empty prompt).

    One trajectory at a time (batch 1, as training), so memory does not grow with their number;
    `on_step(done, total)` counts base-model Euler steps over all trajectories.
    """
    sig = glance_sigmas(steps)
    empty = empty_flags(len(seeds), prompts)
    per = len(base_sigmas) - (1 if float(base_sigmas[-1]) == 0.0 else 0)
    states = []
    for t, seed in enumerate(seeds):
        noise = seed_noise(shape, seed).to(device)
        cb = None if on_step is None else (lambda i, n, t=t: on_step(t * per + i + 1, per * len(seeds)))
        st = path_states(guided(velocity, cfg, empty[t]), noise, base_sigmas, sig, cb)
        if not torch.isfinite(st).all():
            raise GlanceError(f"trajectory {t} (seed {seed}): the base model's path is not finite")
        states.append(st.cpu())
    return {"sigmas": sig, "states": torch.cat(states, dim=1), "empty": empty}


def distill_loss(trajectories, steps, phase, velocity, cfg, seed=0):
    """A `loss(model, x0, noise, sigma, k)` for `train_lora`: k-th step of `phase` lands on a random path.

    The prediction is the guided velocity at `cfg` (the LoRA active in both passes, as when sampling) on the
    path's own prompt (the caption, or the empty prompt for the paths made on it); x0 / noise of the paper's
    objective are unused.
    """
    ph = [st for st in steps if st.phase == phase]
    sig = trajectories["sigmas"]
    states = trajectories["states"]
    idx = [(sig.index(float(st.sigma_from)), sig.index(float(st.sigma_to))) for st in ph]
    gen = torch.Generator().manual_seed(int(seed) % SEED_SPACE)
    empty = trajectories.get("empty") or [False] * states.shape[1]
    v = {e: guided(velocity, cfg, e) for e in (False, True)}

    def loss(model, x0, noise, sigma, k):
        n = int(torch.randint(states.shape[1], (1,), generator=gen))
        i, j = idx[k]
        x = states[i, n:n + 1].to(x0)
        target = (states[j, n:n + 1].to(x0) - x) / (sig[j] - sig[i])
        s = torch.full((1,), float(ph[k].sigma), dtype=torch.float32, device=x0.device)
        return F.mse_loss(v[empty[n]](x, s).float(), target.float())
    return loss


def meta(objective, seeds=(), cfg=None, student_cfg=None, base_steps=None, prompts=CAPTION):
    """The Glance metadata fields that record the objective and its data (JSON-safe)."""
    if objective == FLOW:
        return {"objective": FLOW}
    return {"objective": objective, "trajectories": len(seeds), "trajectory_seeds": [str(s) for s in seeds],
            "trajectory_prompts": prompts, "distill_cfg": float(cfg), "student_cfg": float(student_cfg),
            "distill_base_steps": int(base_steps)}
