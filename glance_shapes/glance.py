"""Glance on the teacher: the slow/fast pair trained from ONE of its own samples with `glance_core.train`
(the loss and step the ComfyUI training node uses), as run-time adapters (`glance_core.runtime`)."""
import torch
import torch.nn.functional as F

from glance_core import distill, runtime
from glance_core.families import RECIPE_LAYERS
from glance_core.plan import phase_seed
from glance_core.train import TrainConfig, TrainingError, lora_pair_params, train_lora
from . import DISTILL_TRAJECTORIES, OBJECTIVES
from .family import FAMILY
from .sampling import glance_schedule, plain_steps, trajectory


def target_modules(teacher, layers=RECIPE_LAYERS):
    """[(name, Linear)] a pair adapts: the SD3 recipe's attention q/k/v/out projections of every block, or the
    timestep embedder's two linears (`layers`, one of glance_core.families.LAYERS)."""
    pattern = FAMILY.layer_pattern(layers)
    return [(n, m) for n, m in teacher.transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and pattern.search(n)]


def teacher_velocity(teacher, cond):
    """velocity(x, sigma [B], dropped) of the bare teacher for one caption's conditioning (no adapter)."""
    def velocity(x, sigma, dropped):
        with runtime.active(replace=True):
            return teacher.velocity(x, sigma, teacher.empty_like(cond) if dropped else cond)
    return velocity


def train_pair(teacher, caption, seed, objective="flow-matching", steps=60, rank=None, alpha=None, lr=None,
               cfg=1.0, on_step=None, trajectories=DISTILL_TRAJECTORIES, layers=RECIPE_LAYERS,
               prompts=distill.CAPTION):
    """Train the pair on the teacher's 50-step sample for (caption, seed).

    objective "flow-matching" is the paper's: x_sigma = (1 - sigma) x0 + sigma noise with fresh noise, target
    noise - x0, at each phase's 5 sigmas. "trajectory" regresses, at the same sigmas, the teacher's own 50-step
    path: input its state at the sigma, target the velocity that reaches its state at the next Glance sigma.
    `cfg`: the guidance the pair will sample with. The training sample is the teacher's 50-step picture at that
    guidance; the trajectory objective regresses the guided velocity (both passes through the LoRA), while
    flow matching trains the plain conditional prediction, as the paper does. "distill" is glance_core.distill's
    objective on `trajectories` guided 50-step paths of the caption (seeds: `seed`, then 1001, 1002 ...; the
    held-out seeds 1..64 are never used), no picture needed; `prompts` distill.MIX puts every second path on the
    empty prompt. `layers`: which layers the pair adapts (glance_core.families.LAYERS).
    Returns ({"slow": Adapter, "fast": Adapter}, {"slow": losses, "fast": losses}, sample [1, 3, 32, 32] in [0, 1]).
    `on_step(phase, i, loss)` is called after each step.
    """
    if objective not in OBJECTIVES:
        raise TrainingError(f"objective {objective!r}: choose one of {', '.join(OBJECTIVES)}")
    recipe = FAMILY.recipe
    rank = rank or recipe["rank"]
    alpha = alpha or 4.0 * rank
    sched = glance_schedule("consistent")
    path = trajectory(teacher, caption, seed, sched.base_steps, cfg)
    x0 = path[0.0]
    cond = teacher.cond([caption])
    adapters, losses = {}, {}
    paths = None
    if objective == "distill":
        base = teacher_velocity(teacher, cond)
        paths = distill.make_trajectories(base, tuple(x0.shape), [seed] + [1000 + i for i in range(1, trajectories)],
                                          [st.sigma for st in plain_steps(sched.base_steps)], sched.steps, cfg,
                                          prompts=prompts)
    gen = torch.Generator().manual_seed(seed)
    for k, phase in enumerate(("slow", "fast")):
        adapter = runtime.Adapter(phase, trainable=True)
        for _, module in target_modules(teacher, layers):
            down, up = lora_pair_params((rank, module.in_features), (module.out_features, rank), rank, generator=gen)
            adapter.add(module, down, up, alpha / rank)
        targets = loss = None
        if objective == "trajectory":
            targets = [(path[st.sigma], (path[st.sigma_to] - path[st.sigma]) / (st.sigma_to - st.sigma_from))
                       for st in sched.steps if st.phase == phase]

            def loss(model, x0, noise, sigma, k, targets=targets):  # regress the path, not fresh-noise targets
                xt, v = targets[k]
                return F.mse_loss(model(xt, sigma).float(), v.float())

        def velocity(xt, sigma, dropped, adapter=adapter):
            with runtime.active(adapter, replace=True):
                if targets is not None:
                    return teacher.guided_velocity(xt, sigma, cond, cfg)
                return teacher.velocity(xt, sigma, teacher.empty_like(cond) if dropped else cond)
        if paths is not None:
            loss = distill.distill_loss(paths, sched.steps, phase, velocity, cfg, seed=phase_seed(seed, k))
        settings = TrainConfig(steps=steps, lr=lr or recipe["lr"], weight_decay=recipe["weight_decay"],
                               seed=phase_seed(seed, k),
                               lr_decay=distill.lr_decay(distill.DISTILL if paths is not None else None))
        with torch.enable_grad():
            losses[phase] = train_lora(velocity, adapter.parameters(), x0, sched.phase_sigmas(phase), settings,
                                       on_step=(lambda i, loss, phase=phase: on_step(phase, i, loss))
                                       if on_step else None, phase=f"{phase} LoRA", loss=loss)
        adapter.freeze()
        adapters[phase] = adapter
    return adapters, losses, ((x0 + 1) / 2).clamp(0, 1)
