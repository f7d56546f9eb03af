"""GlanceTrainLoRAPair: train a Slow/Fast LoRA pair from one reference image, inside ComfyUI."""
import hashlib
import logging
import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import node_helpers
import numpy as np
import torch
from comfy_api.v0_0_2 import io

from ..glance_core import __version__
from ..glance_core import runtime
from ..glance_core.errors import GlanceError
from ..glance_core.lora import GlanceMeta, save_lora
from ..glance_core.lora.writer import save_lora_diffusers
from ..glance_core.schedule import DEFAULTS, build_schedule
from ..glance_core.train import RECIPES, TrainConfig, train_lora
from .comfy_model import family_of, model_label, require_flow
from .loss_plot import loss_curve_image
from .pair import GlancePair, with_pair
from .training import IN_PLACE_SAFE, TrainLoop, build_adapter, materialise, trainable_blocks, training_targets

log = logging.getLogger("glance")
PHASE_CHOICES = {"both": ("slow", "fast"), "slow only": ("slow",), "fast only": ("fast",)}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
MIN_SIDE = 256


def pair_paths(name, overwrite, phases):
    """Final paths <loras>/glance/<name>_<phase>.safetensors; GlanceError if taken (checked before training)."""
    if not name or not name.strip():
        raise GlanceError("output_name: empty; give the pair a name")
    if any(c in name for c in "/\\:") or name.strip() in (".", "..") or name != name.strip():
        raise GlanceError(f"output_name: {name!r} must be a plain file name (no folders, separators or "
                          "surrounding spaces)")
    folder = os.path.join(folder_paths.get_folder_paths("loras")[0], "glance")
    paths = {p: os.path.join(folder, f"{name}_{p}.safetensors") for p in phases}
    taken = [p for p in paths.values() if os.path.exists(p)]
    if taken and not overwrite:
        raise GlanceError(f"output_name: {', '.join(taken)} exists; choose another name or enable overwrite")
    return paths


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
    """sha256 of the training image's 8-bit pixels (what the metadata records)."""
    return hashlib.sha256((img[0].cpu().numpy() * 255).round().astype(np.uint8).tobytes()).hexdigest()


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
                image_index, empty_prompt=None) -> io.NodeOutput:
        return io.NodeOutput(*train_pair(
            model, vae, image, positive, empty_prompt, output_name, steps, learning_rate, rank, alpha,
            caption_dropout, seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite,
            export_diffusers, image_index))


def _progress_text(text):
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except (ImportError, AttributeError):
        pass


def train_pair(model, vae, image, positive, empty_prompt, output_name, steps, learning_rate, rank, alpha,
               caption_dropout, seed, training_dtype, resolution, phases, gradient_checkpointing, overwrite,
               export_diffusers, image_index):
    """The node's work; returns (MODEL, slow path, fast path, loss-curve IMAGE)."""
    require_flow(model)
    if phases not in PHASE_CHOICES:
        raise GlanceError(f"phases: choose one of {', '.join(PHASE_CHOICES)}")
    if training_dtype not in DTYPES:
        raise GlanceError(f"training_dtype: choose one of {', '.join(DTYPES)}")
    if not 1 <= steps <= 10000:
        raise GlanceError(f"steps: {steps} is out of range 1..10000")
    if not 0 <= rank <= 512:
        raise GlanceError(f"rank: {rank} is out of range 0..512 (0 = the family's recipe)")
    todo = PHASE_CHOICES[phases]
    paths = pair_paths(output_name, overwrite, todo)

    family = family_of(model)
    recipe = dict(RECIPES.get(family, RECIPES["default"]))
    rank = rank or recipe["rank"]
    alpha = alpha or 4.0 * rank
    lr = learning_rate or recipe["lr"]
    dropout = recipe["caption_dropout"] if caption_dropout < 0 else caption_dropout
    if dropout > 0 and empty_prompt is None:
        if caption_dropout > 0:
            raise GlanceError("empty_prompt: caption_dropout > 0 needs the empty prompt connected")
        log.info("Glance train: no empty_prompt connected, so the recipe's caption dropout %.2f is off", dropout)
        dropout = 0.0

    multiple = 16
    img, width, height = prepare_image(image, image_index, resolution, multiple)
    if family is None:
        # No preset: compress the model's own 50-step schedule.
        base = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple",
                                               DEFAULTS["base_steps"])
        sched = build_schedule("explicit", width, height, base_sigmas=base.tolist())
    else:
        sched = build_schedule(family, width, height)
    targets = training_targets(model, family)
    if not targets:
        raise GlanceError(f"model: found no attention layers to adapt in this {model_label(model)} model")
    latent = vae.encode(img)
    if family == "flux.1-dev":  # the official FLUX recipe trains with guidance embedding 1.0
        positive = node_helpers.conditioning_set_values(positive, {"guidance": 1.0})
        if empty_prompt is not None:
            empty_prompt = node_helpers.conditioning_set_values(empty_prompt, {"guidance": 1.0})

    total = steps * len(todo)
    pbar = comfy.utils.ProgressBar(total)
    losses = {}
    trained = {}
    dtype = DTYPES[training_dtype]

    def run(model_wrap, x0, extra_args):
        with torch.inference_mode(False), torch.enable_grad():
            from comfy_extras.nodes_train import process_cond_list  # clones the cond tensors out of inference mode
            model_wrap.conds = process_cond_list(model_wrap.conds)
            materialise(mp.model)
            x0 = x0.detach().clone().float()
            dev = x0.device
            gen = torch.Generator().manual_seed(seed)
            with trainable_blocks(mp.model.diffusion_model, gradient_checkpointing,
                                  clone_saved=family not in IN_PLACE_SAFE):
                for k, phase in enumerate(todo):
                    adapter, params = build_adapter(mp, targets, rank, alpha, phase, torch.float32, gen)
                    cfg = TrainConfig(steps=steps, lr=lr, weight_decay=recipe["weight_decay"],
                                      caption_dropout=dropout, seed=seed + 1000 * (k + 1))

                    def velocity(xt, sigma, dropped, adapter=adapter):
                        conds = model_wrap.conds
                        if dropped:
                            model_wrap.conds = {**conds, "positive": conds["negative"]}
                        try:
                            with runtime.active(adapter), torch.autocast(dev.type, dtype=dtype,
                                                                         enabled=dtype != torch.float32):
                                denoised = model_wrap(xt, sigma, **extra_args)
                        finally:
                            model_wrap.conds = conds
                        return (xt - denoised.float()) / sigma.reshape(-1, *([1] * (xt.dim() - 1)))

                    def on_step(i, loss, phase=phase, k=k):
                        comfy.model_management.throw_exception_if_processing_interrupted()
                        pbar.update_absolute(k * steps + i + 1, total)
                        _progress_text(f"{phase} LoRA: step {i + 1}/{steps}, loss {loss:.4f}")
                        if (i + 1) % 10 == 0 or i + 1 == steps:
                            log.info("Glance train %s step %d/%d loss %.5f", phase, i + 1, steps, loss)

                    losses[phase] = train_lora(velocity, adapter.parameters(), x0, sched.phase_sigmas(phase),
                                               cfg, on_step, phase=f"{phase} LoRA")
                    adapter.freeze()
                    trained[phase] = (adapter, params)  # the writers detach and move to CPU

    mp = model.clone()
    guider = comfy.samplers.CFGGuider(mp)
    guider.set_conds(positive, empty_prompt if empty_prompt is not None else positive)
    guider.set_cfg(1.0)  # conds only: the empty prompt is swapped in for dropped-caption steps
    guider.sample(torch.zeros_like(latent), latent, TrainLoop(run), torch.tensor([1.0, 0.0]), seed=seed)

    # Everything trained: only now write files, so an interrupted or failed run leaves none.
    ns = targets[0][1]
    img_sha = image_hash(img)
    written = []
    try:
        for phase in todo:
            adapter, params = trained[phase]
            meta = GlanceMeta(phase=phase, family=sched.family,
                              sigmas=sched.phase_sigmas(phase), rank=rank, alpha=float(alpha),
                              target_modules=[t[0] for t in targets], schedule=sched.to_dict(), image_sha256=img_sha,
                              pack_version=__version__,
                              extra={"steps": steps, "learning_rate": lr, "caption_dropout": dropout, "seed": seed,
                                     "training_dtype": training_dtype, "size": [width, height],
                                     "final_loss": losses[phase][-1], "losses": losses[phase]})
            modules = {n: (d, u, alpha) for n, (d, u) in params.items()}
            written.append(save_lora(paths[phase], modules, meta.to_header(), namespace=ns, overwrite=overwrite))
            if export_diffusers:
                written.append(save_lora_diffusers(paths[phase][:-len(".safetensors")] + "_diffusers.safetensors",
                                                   modules, meta, overwrite=overwrite))
    except BaseException:
        for p in written:
            os.unlink(p)
        raise
    for p in written:
        log.info("Glance train: wrote %s", p)

    slow = trained.get("slow", (runtime.Adapter("slow"), None))[0]
    fast = trained.get("fast", (runtime.Adapter("fast"), None))[0]
    report = f"trained {', '.join(todo)} on {width}x{height}, rank {rank}, alpha {alpha:g}, lr {lr:g}, {steps} steps"
    pair = GlancePair(slow, fast, sched.family, {k: getattr(sched, k) for k in DEFAULTS}, report,
                      fixed_boundary=None if family else sched.boundary)
    curve = loss_curve_image(losses)
    return with_pair(model, pair), paths.get("slow", ""), paths.get("fast", ""), curve
