"""GlanceTrainLoRAPair: train a Slow/Fast LoRA pair from one reference image, inside ComfyUI."""
import dataclasses
import logging
import os
from dataclasses import dataclass

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import node_helpers
import torch
from comfy_api.v0_0_2 import io

from ..glance_core import distill, runtime
from ..glance_core.errors import GlanceError
from ..glance_core.families import LAYERS, RECIPE_LAYERS, get_family
from ..glance_core.integrate import velocity_from_denoised
from ..glance_core.plan import (HASH_OF, PairOutput, Recipe, check_finite, check_seed, image_sha256, pair_meta,
                                phase_seed, resolve_recipe)
from ..glance_core.schedule import DEFAULTS, build_schedule
from ..glance_core.train import TrainConfig, frozen, train_lora
from .comfy_model import family_of, model_label, require_flow
from .loss_plot import loss_curve_image
from .pair import GlancePair, with_pair
from .training import TrainLoop, build_adapter, materialise, trainable_blocks, training_memory, training_targets

log = logging.getLogger("glance")
PHASE_CHOICES = {"both": ("slow", "fast"), "slow only": ("slow",), "fast only": ("fast",)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MIN_SIDE = 256


def pair_output(name, overwrite, phases, export_diffusers=False):
    """The pair's files under <loras>/glance, every check that can be made done now (before training)."""
    folder = os.path.join(folder_paths.get_folder_paths("loras")[0], "glance")
    return PairOutput(folder, name, phases, overwrite, export_diffusers, input_name="output_name",
                      folder_name="loras/glance").check()


def pair_paths(name, overwrite, phases):
    """Final paths <loras>/glance/<name>_<phase>.safetensors; GlanceError if taken (checked before training)."""
    return pair_output(name, overwrite, phases).paths


def prepare_image(image, image_index, resolution, multiple):
    """One HWC image from the batch, resized so its long side is `resolution`, sides multiples of `multiple`."""
    if image.shape[0] > 1 and image_index < 0:
        raise GlanceError(f"image: a batch of {image.shape[0]} images; set image_index to the one to train on")
    if image_index >= image.shape[0]:
        raise GlanceError(f"image_index: {image_index} but the batch has {image.shape[0]} image(s)")
    img = image[max(image_index, 0)][None, ..., :3]
    h, w = img.shape[1:3]
    if min(h, w) < MIN_SIDE:
        raise GlanceError(f"image: {w}x{h} px is too small; the reference image needs at least {MIN_SIDE} px a side")
    scale = resolution / max(h, w)
    nw, nh = (max(multiple, round(v * scale / multiple) * multiple) for v in (w, h))
    if (nw, nh) != (w, h):
        img = comfy.utils.common_upscale(img.movedim(-1, 1), nw, nh, "bilinear", "disabled").movedim(1, -1)
    return img.clamp(0, 1), nw, nh


def image_hash(img):
    """sha256 of the training image's 8-bit pixels (what the metadata records; glance_core.plan.image_sha256)."""
    return image_sha256(img)


class GlanceTrainLoRAPair(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="GlanceTrainLoRAPair",
            display_name="Glance Train LoRA Pair",
            category="training/glance",
            description="Train a Glance Slow/Fast LoRA pair for this model from ONE reference image and its "
                        "caption: each LoRA learns the flow-matching target at its own few sigmas of the Glance "
                        "schedule (computed for this image's size). Saves <loras>/glance/<name>_slow and _fast, "
                        "and returns the model with the new pair attached.",
            inputs=[
                io.Model.Input("model", tooltip="The flow-matching base model to train the pair for."),
                io.Vae.Input("vae", tooltip="The model's VAE; encodes the reference image once."),
                io.Image.Input("image", tooltip="The reference image (one; see image_index for batches)."),
                io.Conditioning.Input("positive", tooltip="The image's caption, encoded with the usual text "
                                                          "encode node."),
                io.String.Input("output_name", default="my_glance_pair",
                                tooltip="File name stem: saves <loras>/glance/<name>_slow.safetensors and "
                                        "_fast.safetensors."),
                io.Int.Input("steps", default=60, min=1, max=10000,
                             tooltip="Optimizer steps per LoRA (official recipe: 60)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-5, round=1e-6,
                               tooltip="0 = the family's recipe (Qwen-Image 3e-4, FLUX 5e-4)."),
                io.Int.Input("rank", default=0, min=0, max=512,
                             tooltip="LoRA rank; 0 = the family's recipe (Qwen-Image 32, FLUX 16)."),
                io.Float.Input("alpha", default=0.0, min=0.0, max=4096.0, step=1.0,
                               tooltip="LoRA alpha (scale = alpha / rank); 0 = 4 x rank, as the official recipes."),
                io.Float.Input("caption_dropout", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Share of steps that use the empty prompt; -1 = the family's recipe "
                                       "(Qwen-Image 0.1, FLUX 0). Needs empty_prompt when above 0."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="Seed of the LoRA initialisation, noise and sigma draws."),
                io.Combo.Input("training_dtype", options=list(DTYPES), default="bf16",
                               tooltip="Compute precision of the model during training (the LoRA weights stay "
                                       "float32). Use fp32 on CPU."),
                io.Int.Input("resolution", default=1024, min=256, max=4096, step=16,
                             tooltip="The image is resized so its long side is this many pixels."),
                io.Combo.Input("phases", options=list(PHASE_CHOICES), default="both",
                               tooltip="Which LoRAs to train; both share one encoded image and one model."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute block activations in backward: much less memory, ~30% "
                                         "slower."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace existing files of the same name (otherwise refuse before "
                                         "training starts)."),
                io.Boolean.Input("export_diffusers", default=False,
                                 tooltip="Also write <name>_<phase>_diffusers.safetensors for diffusers' "
                                         "load_lora_weights (peft layout, scale folded in)."),
                io.Int.Input("image_index", default=-1, min=-1, max=4095,
                             tooltip="Which image of a batch to train on; -1 = the input must be one image."),
                io.Conditioning.Input("empty_prompt", optional=True,
                                      tooltip="The empty prompt, encoded: used for caption dropout."),
                io.Combo.Input("objective", options=list(distill.OBJECTIVES), default=distill.FLOW, optional=True,
                               tooltip="flow matching (paper): learn the image at each LoRA's sigmas. distill "
                                       "50-step path: each Glance step learns to land where this model's own "
                                       "50-step path is (paths it generates itself from the caption; the image "
                                       "then only gives the size; the learning rate decays to 0 along a cosine)."),
                io.Int.Input("trajectories", default=8, min=1, max=distill.MAX_TRAJECTORIES, optional=True,
                             tooltip="distill: how many 50-step paths to generate (seeds seed, seed+1, ...; the "
                                     "first is the noise a sampler with this seed uses). Each costs one 50-step "
                                     "generation (two model calls a step above CFG 1)."),
                io.Float.Input("distill_cfg", default=1.0, min=1.0, max=30.0, step=0.1, optional=True,
                               tooltip="distill: the CFG of the 50-step paths, the one you sample with. Above 1 "
                                       "needs empty_prompt (the negative)."),
                io.Float.Input("student_cfg", default=0.0, min=0.0, max=30.0, step=0.1, optional=True,
                               tooltip="distill: the CFG the pair will sample at; 0 = distill_cfg. 1 with "
                                       "distill_cfg above 1 gives a pair that needs one model call a step."),
                io.Combo.Input("layers", options=list(LAYERS), default=RECIPE_LAYERS, optional=True,
                               tooltip="Which layers the pair adapts. recipe (paper): the family's official "
                                       "layers. timestep embedder: only its two small linears, a function of the "
                                       "noise level alone: it cannot memorise the caption, so a distilled pair "
                                       "carries to other prompts (the best objective on the bundled teacher)."),
                io.Combo.Input("trajectory_prompts", options=list(distill.PROMPTS), default=distill.CAPTION,
                               optional=True,
                               tooltip="distill: what the paths are conditioned on: the caption, or every second "
                                       "path on the empty prompt (needs empty_prompt)."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the new pair attached, ready for Glance Sampler."),
                io.String.Output(display_name="slow_path", tooltip="Where the Slow LoRA was saved."),
                io.String.Output(display_name="fast_path", tooltip="Where the Fast LoRA was saved."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step of each LoRA."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, image, positive, output_name, steps, learning_rate, rank, alpha, caption_dropout,
                seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite, export_diffusers,
                image_index, empty_prompt=None, objective=distill.FLOW, trajectories=8, distill_cfg=1.0,
                student_cfg=0.0, layers=RECIPE_LAYERS, trajectory_prompts=distill.CAPTION) -> io.NodeOutput:
        return io.NodeOutput(*train_pair(
            model, vae, image, positive, empty_prompt, output_name, steps, learning_rate, rank, alpha,
            caption_dropout, seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite,
            export_diffusers, image_index, objective, trajectories, distill_cfg, student_cfg, layers,
            trajectory_prompts))


def _progress_text(text):
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except (ImportError, AttributeError):
        pass


@dataclass(frozen=True)
class Prepared:
    """Everything train() needs, checked before the first step."""
    family: object          # glance_core Family, or None (a flow model without preset: explicit sigmas)
    recipe: Recipe
    phases: tuple
    output: PairOutput
    sched: object           # glance_core Schedule at the image's size
    targets: list
    image: torch.Tensor     # [1, H, W, 3] in [0, 1], resized
    width: int
    height: int
    positive: list
    empty_prompt: list
    seed: int
    steps: int
    dtype: torch.dtype
    gradient_checkpointing: bool
    distill: dict = None    # the distillation objective's settings (None: the paper's objective)
    layers: str = RECIPE_LAYERS  # which layers the pair adapts (glance_core.families.LAYERS)


def prepare(model, image, positive, empty_prompt, output_name, steps, learning_rate, rank, alpha, caption_dropout,
            seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite, export_diffusers,
            image_index, objective=distill.FLOW, trajectories=8, distill_cfg=1.0, student_cfg=0.0,
            layers=RECIPE_LAYERS, trajectory_prompts=distill.CAPTION):
    """Check every input and the output files, resolve the recipe and the schedule: nothing runs yet."""
    require_flow(model)
    dist = _distill_settings(objective, trajectories, distill_cfg, student_cfg, seed, empty_prompt,
                             trajectory_prompts)
    if phases not in PHASE_CHOICES:
        raise GlanceError(f"phases: choose one of {', '.join(PHASE_CHOICES)}")
    if training_dtype not in DTYPES:
        raise GlanceError(f"training_dtype: choose one of {', '.join(DTYPES)}")
    if not 1 <= steps <= 10000:
        raise GlanceError(f"steps: {steps} is out of range 1..10000")
    check_seed(seed)
    todo = PHASE_CHOICES[phases]
    name = family_of(model)
    family = None if name is None else get_family(name)
    rec = resolve_recipe(family or get_family("explicit"), rank, alpha, learning_rate, caption_dropout)
    output = pair_output(output_name, overwrite, todo, export_diffusers)
    if rec.caption_dropout > 0 and empty_prompt is None:
        if caption_dropout > 0:
            raise GlanceError("empty_prompt: caption_dropout > 0 needs the empty prompt connected")
        log.info("Glance train: no empty_prompt connected, so the recipe's caption dropout %.2f is off",
                 rec.caption_dropout)
        rec = dataclasses.replace(rec, caption_dropout=0.0)
    check_finite(image, "image")
    for label, cond in (("positive", positive), ("empty_prompt", empty_prompt or [])):
        for c in cond:
            check_finite(c[0], label)
            for k, v in c[1].items():
                check_finite(v, f"{label} ({k})")
    multiple = (family or get_family("explicit")).pixel_multiple
    img, width, height = prepare_image(image, image_index, resolution, multiple)
    if family is None:
        # No preset: compress the model's own 50-step schedule.
        base = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple",
                                               DEFAULTS["base_steps"])
        sched = build_schedule("explicit", width, height, base_sigmas=base.tolist())
    else:
        sched = build_schedule(family, width, height)
    targets = training_targets(model, name, layers)
    if not targets:
        raise GlanceError(f"model: found no {'attention' if layers == RECIPE_LAYERS else layers} layers to adapt "
                          f"in this {model_label(model)} model (layers: {layers})")
    if family is not None and family.train_guidance is not None:  # e.g. FLUX's recipe trains at guidance 1.0
        positive = node_helpers.conditioning_set_values(positive, {"guidance": family.train_guidance})
        if empty_prompt is not None:
            empty_prompt = node_helpers.conditioning_set_values(empty_prompt, {"guidance": family.train_guidance})
    return Prepared(family, rec, todo, output, sched, targets, img, width, height, positive, empty_prompt, seed,
                    steps, DTYPES[training_dtype], gradient_checkpointing, dist, layers)


def _distill_settings(objective, trajectories, distill_cfg, student_cfg, seed, empty_prompt, prompts):
    """The distillation settings checked (errors name the input), or None for the paper's objective."""
    student = distill.check_settings(objective, trajectories, distill_cfg, student_cfg, prompts=prompts)
    if student is None:
        return None
    if max(distill_cfg, student) != 1 and empty_prompt is None:
        raise GlanceError("empty_prompt: distill_cfg/student_cfg above 1 needs the empty prompt connected (the "
                          "negative of guidance)")
    if prompts == distill.MIX and empty_prompt is None:
        raise GlanceError(f"empty_prompt: trajectory_prompts {prompts!r} needs the empty prompt connected")
    return {"objective": objective, "seeds": distill.trajectory_seeds(seed, trajectories), "cfg": float(distill_cfg),
            "student_cfg": student, "prompts": prompts}


def _model_velocity(model_wrap, extra_args, dtype, adapter=None):
    """velocity(xt, sigma, dropped) of ComfyUI's model call (sigma: flow sigma, [B]); `adapter` active if given."""
    def velocity(xt, sigma, dropped):
        conds = model_wrap.conds
        if dropped:
            model_wrap.conds = {**conds, "positive": conds["negative"]}
        try:
            with runtime.active(adapter), torch.autocast(xt.device.type, dtype=dtype,
                                                         enabled=dtype != torch.float32):
                denoised = model_wrap(xt, sigma, **extra_args)
        finally:
            model_wrap.conds = conds
        return velocity_from_denoised(xt, denoised.float(), sigma)
    return velocity


def make_trajectories(model_wrap, extra_args, x0, p):
    """The base model's own paths for the distillation objective, one at a time under no_grad (progress, cancel)."""
    d, sched = p.distill, p.sched
    base = list(sched.base_sigmas) if sched.base_sigmas else p.family.base_sigmas(sched.base_steps, p.width,
                                                                                  p.height)
    total = len(d["seeds"]) * len(base)
    bar = comfy.utils.ProgressBar(total)

    def on_step(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total)
        _progress_text(f"base-model paths: step {done}/{total}")
    return distill.make_trajectories(_model_velocity(model_wrap, extra_args, p.dtype), tuple(x0.shape), d["seeds"],
                                     base, sched.steps, d["cfg"], on_step=on_step, device=x0.device,
                                     prompts=d["prompts"])


def train(model, vae, p):
    """Train every phase of the prepared plan through ComfyUI's model call; returns (trained, losses)."""
    latent = vae.encode(p.image)
    check_finite(latent, "vae (the encoded image)")
    total = p.steps * len(p.phases)
    pbar = comfy.utils.ProgressBar(total)
    losses, trained = {}, {}
    rec, dtype = p.recipe, p.dtype
    clone_saved = not (p.family is not None and p.family.in_place_safe)

    def run(model_wrap, x0, extra_args):
        with torch.inference_mode(False), torch.enable_grad():
            from comfy_extras.nodes_train import process_cond_list  # clones the cond tensors out of inference mode
            model_wrap.conds = process_cond_list(model_wrap.conds)
            x0 = x0.detach().clone().float()
            dev = x0.device
            fit_memory(mp, p, x0, dev)
            materialise(mp.model)
            gen = torch.Generator().manual_seed(p.seed)
            paths = None if p.distill is None else make_trajectories(model_wrap, extra_args, x0, p)
            with frozen(mp.model.diffusion_model), \
                    trainable_blocks(mp.model.diffusion_model, p.gradient_checkpointing, clone_saved=clone_saved):
                for k, phase in enumerate(p.phases):
                    adapter, params = build_adapter(mp, p.targets, rec.rank, rec.alpha, phase, torch.float32, gen)
                    settings = TrainConfig(steps=p.steps, lr=rec.lr, weight_decay=rec.weight_decay,
                                           caption_dropout=rec.caption_dropout, seed=phase_seed(p.seed, k),
                                           lr_decay=distill.lr_decay(p.distill and p.distill["objective"]))

                    velocity = _model_velocity(model_wrap, extra_args, dtype, adapter)
                    loss = None if paths is None else distill.distill_loss(
                        paths, p.sched.steps, phase, velocity, p.distill["student_cfg"], seed=phase_seed(p.seed, k))

                    def on_step(i, loss, phase=phase, k=k):
                        comfy.model_management.throw_exception_if_processing_interrupted()
                        pbar.update_absolute(k * p.steps + i + 1, total)
                        _progress_text(f"{phase} LoRA: step {i + 1}/{p.steps}, loss {loss:.4f}")
                        if (i + 1) % 10 == 0 or i + 1 == p.steps:
                            log.info("Glance train %s step %d/%d loss %.5f", phase, i + 1, p.steps, loss)

                    losses[phase] = train_lora(velocity, adapter.parameters(), x0, p.sched.phase_sigmas(phase),
                                               settings, on_step, phase=f"{phase} LoRA", loss=loss)
                    adapter.freeze()
                    trained[phase] = (adapter, params)  # the writers detach and move to CPU

    mp = model.clone()
    guider = comfy.samplers.CFGGuider(mp)
    guider.set_conds(p.positive, p.empty_prompt if p.empty_prompt is not None else p.positive)
    guider.set_cfg(1.0)  # conds only: the empty prompt is swapped in for dropped-caption steps
    # The plan's seed may be up to 2^64-1; the sampler's noise is unused here (the loop draws its own).
    guider.sample(torch.zeros_like(latent), latent, TrainLoop(run), torch.tensor([1.0, 0.0]),
                  seed=p.seed % 2 ** 63)
    return trained, losses


def fit_memory(mp, p, x0, dev):
    """Before the first step: estimate the run's device memory, have ComfyUI offload the weights that do not
    fit (partial loading, as lowvram sampling does), report it, or refuse with the settings to change."""
    tokens = x0[0, 0].numel() // (p.family or get_family("explicit")).patch_size ** 2 + p.positive[0][0].shape[1]
    free = None if dev.type == "cpu" else comfy.model_management.get_free_memory(dev)
    try:
        plan = training_memory(mp, p.targets, p.recipe.rank, tokens, p.dtype, p.gradient_checkpointing, free)
    except GlanceError as e:
        raise GlanceError(f"{e} (resolution {p.width}x{p.height}, rank {p.recipe.rank}, gradient_checkpointing "
                          f"{p.gradient_checkpointing}, training_dtype {DTYPE_NAMES[p.dtype]})") from None
    if free is not None and free < plan.lora + plan.activations:
        # ComfyUI frees the room: other models first, then layers of this one (streamed from the CPU per call).
        comfy.model_management.free_memory(plan.lora + plan.activations, dev)
        loaded = mp.loaded_size()
        plan = dataclasses.replace(plan, weights=loaded, offloaded=mp.model_size() - loaded)
    text = f"Glance train: device memory {plan.describe()}"
    log.info(text)
    _progress_text(text)
    return plan


def save(p, trained, losses, training_dtype):
    """Write the pair all or nothing (an overwritten pair stays whole until every new file is complete)."""
    rec = p.recipe
    img_sha = image_sha256(p.image)
    modules = {phase: {n: (d, u, rec.alpha) for n, (d, u) in trained[phase][1].items()} for phase in p.phases}
    metas = {phase: pair_meta(phase, p.sched.family, p.sched, rec, [t[0] for t in p.targets], img_sha,
                              losses[phase], {"steps": p.steps, "seed": p.seed, "training_dtype": training_dtype,
                                              "size": [p.width, p.height], "hash_of": HASH_OF,
                                              "layers": p.layers, **_distill_meta(p)})
             for phase in p.phases}
    written = p.output.write(modules, metas, p.targets[0][1])
    for path in written:
        log.info("Glance train: wrote %s", path)


def _distill_meta(p):
    d = p.distill
    if d is None:
        return distill.meta(distill.FLOW)
    return distill.meta(d["objective"], d["seeds"], d["cfg"], d["student_cfg"], p.sched.base_steps, d["prompts"])


def train_pair(model, vae, image, positive, empty_prompt, output_name, steps, learning_rate, rank, alpha,
               caption_dropout, seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite,
               export_diffusers, image_index, objective=distill.FLOW, trajectories=8, distill_cfg=1.0,
               student_cfg=0.0, layers=RECIPE_LAYERS, trajectory_prompts=distill.CAPTION):
    """The node's work: prepare, train, save; returns (MODEL, slow path, fast path, loss-curve IMAGE)."""
    p = prepare(model, image, positive, empty_prompt, output_name, steps, learning_rate, rank, alpha,
                caption_dropout, seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite,
                export_diffusers, image_index, objective, trajectories, distill_cfg, student_cfg, layers,
                trajectory_prompts)
    trained, losses = train(model, vae, p)
    # Everything trained: only now write files, so an interrupted or failed run leaves none.
    save(p, trained, losses, training_dtype)
    rec, sched = p.recipe, p.sched
    slow = trained.get("slow", (runtime.Adapter("slow"), None))[0]
    fast = trained.get("fast", (runtime.Adapter("fast"), None))[0]
    report = (f"trained {', '.join(p.phases)} on {p.width}x{p.height}, rank {rec.rank}, alpha {rec.alpha:g}, "
              f"lr {rec.lr:g}, {p.steps} steps, layers: {p.layers}" + ("" if p.distill is None else
                                                   f", {p.distill['objective']} ({len(p.distill['seeds'])} paths "
                                                   f"at cfg {p.distill['cfg']:g})"))
    pair = GlancePair(slow, fast, sched.family, sched.settings, report,
                      fixed_boundary=None if p.family else sched.boundary)
    curve = loss_curve_image(losses)
    paths = p.output.paths
    return with_pair(model, pair), paths.get("slow", ""), paths.get("fast", ""), curve
