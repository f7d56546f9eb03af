"""Command line: `python -m glance_core schedule | inspect | generate | train` (see --help).

The bundled teacher's demo is its own package's: `python -m glance_shapes demo`."""
import argparse
import json
import os
import sys

from .errors import GlanceError
from .families import FAMILIES, REGISTRY
from .schedule import DEFAULTS, MODES, build_schedule

# Pixel multiple of every family with a diffusers pipeline, known before a pipeline (and its family) loads.
PIXEL_MULTIPLE = max(f.pixel_multiple for f in REGISTRY if f.pipeline)

MAX_SIDE = 16384   # px, generate's --width/--height
MAX_IMAGES = 64    # generate's --num-images
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def _parser():
    p = argparse.ArgumentParser(prog="python -m glance_core",
                                description="Glance: 10-step sampling with a slow/fast LoRA pair.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("schedule", help="print a Glance schedule as JSON",
                       description="Print the Glance schedule (conditioning sigmas, Euler moves and phases) "
                                   "for a model family at a pixel size, as JSON. Sigmas are in [0, 1]; "
                                   "timesteps are 1000 x sigma.")
    s.add_argument("--family", default="qwen-image", help=f"model family: {', '.join(FAMILIES)}")
    s.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    s.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    s.add_argument("--mode", choices=MODES, default="consistent",
                   help="consistent: Euler between the listed sigmas (default); reference: what the official "
                        "pipeline integrates")
    for name, default in DEFAULTS.items():
        s.add_argument("--" + name.replace("_", "-"), type=int, default=default,
                       help=f"default {default}")
    s.add_argument("--sigmas", help="family 'explicit' only: the base schedule's sigmas, comma-separated")
    s.add_argument("--indent", type=int, default=2, help="JSON indent (default 2)")

    i = sub.add_parser("inspect", help="describe a LoRA file", description="Read a LoRA file and print its "
                       "layout, family, modules, ranks and the scale that would be applied, as JSON.")
    i.add_argument("file")
    i.add_argument("--scale-policy", choices=("as trained", "as stored"), default="as trained")

    manual = argparse.RawDescriptionHelpFormatter
    g = sub.add_parser("generate", help="generate images with a Glance pair on a diffusers pipeline",
                       formatter_class=manual, description=GENERATE_HELP)
    _model_args(g)
    g.add_argument("--slow", help="the Slow LoRA file (.safetensors)")
    g.add_argument("--fast", help="the Fast LoRA file (.safetensors)")
    g.add_argument("--no-pair", action="store_true", help="sample the Glance schedule without adapters (baseline)")
    g.add_argument("--prompt", required=True, help="what to draw")
    g.add_argument("--negative-prompt", default=" ", help="negative prompt of Qwen-Image's true CFG and SD3's CFG (default ' ')")
    g.add_argument("--cfg", type=float, default=5.0, help="Qwen-Image true CFG scale (default 5; 1 = off)")
    g.add_argument("--guidance", type=float, default=3.5, help="FLUX: the guidance embedding; SD3: the classic CFG scale (default 3.5)")
    g.add_argument("--width", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    g.add_argument("--height", type=int, default=1024, help="pixels, a multiple of 16 (default 1024)")
    g.add_argument("--mode", choices=MODES, default="consistent", help="integration mode (default consistent)")
    g.add_argument("--scale-policy", default="as trained",
                   choices=("as trained", "as stored", "as the official pipeline"),
                   help="scale of LoRA files without alpha (default: as trained)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--out", default="glance.png", help="output PNG; with several images _1, _2 ... are added")
    for name, default in DEFAULTS.items():
        g.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=f"default {default}")

    t = sub.add_parser("train", help="train a Glance pair from one image on a diffusers pipeline",
                       formatter_class=manual, description=TRAIN_HELP)
    _model_args(t)
    t.add_argument("--image", required=True, help="the reference image (PNG, JPEG ...)")
    t.add_argument("--caption", required=True, help="its caption")
    t.add_argument("--name", default="my_glance_pair", help="file stem: NAME_slow / NAME_fast .safetensors")
    t.add_argument("--out-dir", default=".", help="where to write the pair (default .)")
    t.add_argument("--steps", type=int, default=60, help="optimizer steps per LoRA (default 60)")
    t.add_argument("--rank", type=int, help="LoRA rank (default: the family's recipe)")
    t.add_argument("--alpha", type=float, help="LoRA alpha (default 4 x rank)")
    t.add_argument("--lr", type=float, help="learning rate (default: the family's recipe)")
    t.add_argument("--caption-dropout", type=float, help="share of empty-prompt steps (default: the recipe)")
    t.add_argument("--resolution", type=int, default=1024, help="long side of the training image (default 1024)")
    t.add_argument("--phases", choices=("both", "slow", "fast"), default="both", help="which LoRAs (default both)")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument("--overwrite", action="store_true", help="replace existing files")
    t.add_argument("--objective", default="flow", help="flow = the paper's flow matching on the image (default); "
                   "distill = each Glance step learns to land on the base model's own 50-step path (trajectories "
                   "it generates itself from the caption; the image then only gives the size)")
    t.add_argument("--trajectories", type=int, default=8,
                   help="distill: how many base-model paths (seeds SEED, SEED+1, ...; default 8)")
    t.add_argument("--distill-cfg", type=float, default=1.0,
                   help="distill: the plain CFG scale of the base paths, the one you sample with (default 1 = off)")
    t.add_argument("--student-cfg", type=float,
                   help="distill: the CFG the pair will sample at (default --distill-cfg; 1 with --distill-cfg 3 "
                        "= one model call per step)")
    t.add_argument("--trajectory-prompts", default="caption",
                   help="distill: caption = every path on the caption (default); mix = every second path on the "
                        "empty prompt")
    t.add_argument("--layers", default="recipe",
                   help="recipe = the family's official layers (default, the paper's); timestep = only the "
                        "timestep embedder's two linears (a function of the noise level alone; carries to other "
                        "prompts)")

    return p


GENERATE_HELP = """Generate with a Glance Slow/Fast LoRA pair on a diffusers pipeline folder (Qwen-Image,
FLUX.1-dev or SD3/SD3.5), in 10 steps by default. Both LoRAs go into the one transformer as two adapters.

examples:
  python -m glance_core generate --model ./Qwen-Image --slow glance_qwen_slow.safetensors \
      --fast glance_qwen_fast.safetensors --prompt "a red fox in the snow" --out fox.png
  python -m glance_core generate --model ./FLUX.1-dev --slow my_slow.safetensors --fast my_fast.safetensors \
      --prompt "a teapot" --guidance 3.5 --width 768 --height 1344
"""
TRAIN_HELP = """Train a Glance pair from ONE image and its caption on a diffusers pipeline folder, with the
same loss and step as the ComfyUI node: each LoRA at its own sigmas of the Glance schedule for this image's
size. Writes NAME_slow.safetensors and NAME_fast.safetensors (loadable in ComfyUI and by `generate`).

example:
  python -m glance_core train --model ./Qwen-Image --image teapot.png --caption "a blue teapot" --name teapot
"""


def _model_args(p):
    p.add_argument("--model", required=True, help="a diffusers pipeline folder (with model_index.json)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="torch device (default cuda if present)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16" if _cuda() else "fp32",
                   help="model precision (default bf16 on GPU, fp32 on CPU)")


def _cuda():
    import torch
    return torch.cuda.is_available()


def _load_pipeline(args):
    import torch
    _model_family(args)
    import warnings
    from diffusers import DiffusionPipeline
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype; the old name works everywhere
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(args.device)
    from .diffusers_glance import _family
    _family(pipe)
    return pipe


def _generate(args):
    import torch
    from .diffusers_glance import generate, load_pair
    family = _check_generate(args)  # every flag, before the minutes a large pipeline takes to load
    pair = None if args.no_pair else _read_pair(args, family)
    pipe = _load_pipeline(args)
    if pair is not None:
        print(load_pair(pipe, *pair, args.scale_policy), file=sys.stderr)
    images = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg,
                      guidance_scale=args.guidance, height=args.height, width=args.width, mode=args.mode,
                      generator=torch.Generator(args.device).manual_seed(args.seed),
                      num_images_per_prompt=args.num_images, use_pair=not args.no_pair,
                      **_step_settings(args))
    stem, ext = os.path.splitext(args.out)
    for k, img in enumerate(images):
        path = args.out if len(images) == 1 else f"{stem}_{k + 1}{ext or '.png'}"
        img.save(path)
        print(path)


def _check_generate(args):
    """Validate generate's flags without loading the model; returns the pipeline's family."""
    if args.no_pair and (args.slow or args.fast):
        raise GlanceError("--no-pair samples without adapters: drop --slow/--fast, or drop --no-pair")
    if not args.no_pair and not (args.slow and args.fast):
        raise GlanceError("give --slow and --fast (or --no-pair for the baseline)")
    family = _model_family(args)
    _check_device(args.device)
    _check_int("--seed", args.seed, 0, 2 ** 64 - 1)
    _check_int("--num-images", args.num_images, 1, MAX_IMAGES)
    _check_float("--cfg", args.cfg, 0.0, 100.0)
    _check_float("--guidance", args.guidance, 0.0, 100.0)
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v <= 0 or v % PIXEL_MULTIPLE or v > MAX_SIDE:
            raise GlanceError(f"{flag} {v}: must be a positive multiple of {PIXEL_MULTIPLE} px (8x VAE, 2x2 patches), "
                              f"at most {MAX_SIDE}")
    try:
        build_schedule(family, args.width, args.height, args.mode, **_step_settings(args))
    except GlanceError as e:
        raise GlanceError(f"schedule flags (--width/--height/--mode/--*-steps): {e}") from None
    stem, ext = os.path.splitext(args.out)
    if ext.lower() not in IMAGE_EXTS:
        raise GlanceError(f"--out {args.out}: give an image file name ending in {', '.join(IMAGE_EXTS)}")
    _check_writable_dir("--out", os.path.dirname(os.path.abspath(args.out)))
    return family


def _read_pair(args, family):
    """Read --slow/--fast and check they form one pair for this pipeline's family (Glance metadata)."""
    from .lora import check_pair_phases, read_lora
    policy = "as stored" if args.scale_policy == "as the official pipeline" else args.scale_policy
    slow, fast = (_named("--slow", read_lora, args.slow, policy), _named("--fast", read_lora, args.fast, policy))
    check_pair_phases(slow, fast, ("--slow", "--fast"))
    for lora, flag in ((slow, "--slow"), (fast, "--fast")):
        if lora.family and lora.family != family:
            raise GlanceError(f"{flag}: {os.path.basename(lora.path)} is a {lora.family} LoRA but --model is a "
                              f"{family} pipeline: give a pair made for this model")
    return slow, fast


def _named(flag, fn, *a):
    try:
        return fn(*a)
    except GlanceError as e:
        raise GlanceError(f"{flag}: {e}") from None


def _model_family(args):
    """The Glance family of the --model folder, read from its model_index.json without loading weights."""
    if not os.path.isdir(args.model):
        raise GlanceError(f"--model {args.model}: no such folder")
    index = os.path.join(args.model, "model_index.json")
    if not os.path.isfile(index):
        raise GlanceError(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json)")
    try:
        with open(index, encoding="utf-8") as f:
            cls = json.load(f).get("_class_name")
    except (OSError, ValueError, RecursionError, AttributeError) as e:
        raise GlanceError(f"--model {args.model}: unreadable model_index.json ({e})") from None
    by_pipeline = {f.pipeline: f.name for f in REGISTRY if f.pipeline}
    if cls not in by_pipeline:
        raise GlanceError(f"--model {args.model}: a {cls} pipeline is not supported; use one of "
                          f"{', '.join(by_pipeline)}")
    return by_pipeline[cls]


def _check_device(device):
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as e:
        raise GlanceError(f"--device {device!r}: not a torch device ({e})") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index or 0) >= n:
            raise GlanceError(f"--device {device}: this machine has {n} CUDA device(s)")
        return
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise GlanceError(f"--device {device}: MPS is not available on this machine")
        return
    raise GlanceError(f"--device {device}: use cpu, cuda, cuda:N or mps")


def _check_int(flag, v, lo, hi):
    if not lo <= v <= hi:
        raise GlanceError(f"{flag} {v}: must be in {lo}..{hi}")


def _check_float(flag, v, lo, hi, open_lo=False):
    import math
    if v is None:
        return
    if not math.isfinite(v) or v < lo or v > hi or (open_lo and v == lo):
        rng = f"({lo}, {hi}]" if open_lo else f"[{lo}, {hi}]"
        raise GlanceError(f"{flag} {v}: must be a finite number in {rng}")


def _check_writable_dir(flag, folder):
    """Refuse a missing or unwritable output folder now, by writing and removing a probe file in it."""
    import tempfile
    if not os.path.isdir(folder):
        raise GlanceError(f"{flag}: folder {folder} does not exist" if not os.path.exists(folder)
                          else f"{flag}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".glance-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise GlanceError(f"{flag}: cannot write to {folder} ({e.strerror or e})") from None


def _train(args):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm
    from .diffusers_train import train_pair
    phases = _check_train(args)  # every flag, before the minutes a large pipeline takes to load
    # (train_pair checks the outputs again before its first step: the folder may change meanwhile)
    objective, prompts, layers = _check_distill(args)
    try:
        img = Image.open(args.image).convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise GlanceError(f"--image {args.image}: cannot read it as an image ({e})") from None
    w, h = img.size
    if min(w, h) < 256:
        raise GlanceError(f"--image {args.image}: {w}x{h} px; the reference image needs at least 256 px a side")
    scale = args.resolution / max(w, h)
    m = PIXEL_MULTIPLE
    w2, h2 = (max(m, round(v * scale / m) * m) for v in (w, h))
    x = torch.from_numpy(np.asarray(img.resize((w2, h2), Image.BICUBIC), dtype=np.float32) / 255.0)
    pipe = _load_pipeline(args)
    x = x.permute(2, 0, 1)[None].to(args.device)
    bar = tqdm(total=args.steps * len(phases), desc="Glance training")
    paths_bar = None

    def trajectory_step(done, total):
        nonlocal paths_bar
        if paths_bar is None:
            paths_bar = tqdm(total=total, desc="Base-model paths (steps)")
        paths_bar.update(done - paths_bar.n)

    def step(phase, i, loss):
        bar.set_postfix(lora=phase, loss=f"{loss:.4f}")
        bar.update()
    try:
        paths = train_pair(pipe, image=x, prompt=args.caption, steps=args.steps, rank=args.rank, alpha=args.alpha,
                           learning_rate=args.lr, caption_dropout=args.caption_dropout, seed=args.seed,
                           phases=phases, out_dir=args.out_dir, name=args.name, overwrite=args.overwrite,
                           on_step=step, objective=objective, trajectories=args.trajectories,
                           distill_cfg=args.distill_cfg, student_cfg=args.student_cfg, on_trajectory=trajectory_step,
                           layers=layers, trajectory_prompts=prompts)
    finally:
        bar.close()
        if paths_bar is not None:
            paths_bar.close()
    for p in paths.values():
        print(p)


def _check_train(args):
    """Validate train's flags without loading the model; the outputs with the training plan's own check."""
    from .plan import PairOutput
    phases = ("slow", "fast") if args.phases == "both" else (args.phases,)
    PairOutput(args.out_dir, args.name, phases, args.overwrite, input_name="--name", folder_name="--out-dir",
               overwrite_hint="pass --overwrite").check()
    _model_family(args)
    _check_device(args.device)
    _check_int("--steps", args.steps, 1, 10000)
    if args.rank is not None:
        _check_int("--rank", args.rank, 1, 512)
    _check_float("--alpha", args.alpha, 0.0, 4096.0, open_lo=True)
    _check_float("--lr", args.lr, 0.0, 1.0, open_lo=True)
    _check_float("--caption-dropout", args.caption_dropout, 0.0, 1.0)
    _check_int("--resolution", args.resolution, 256, 4096)
    _check_int("--seed", args.seed, 0, 2 ** 64 - 1)
    if not os.path.isfile(args.image):
        raise GlanceError(f"--image {args.image}: no such file")
    return phases


def _step_settings(args):
    """The four step-setting flags as build_schedule keywords."""
    return {k: getattr(args, k) for k in DEFAULTS}


def _check_distill(args):
    """Validate the objective's and layers' flags (errors name the flag); returns the full names of the
    objective, the trajectory prompts and the layers."""
    from . import distill
    from .families import LAYERS
    if args.objective not in distill.CLI_NAMES:
        raise GlanceError(f"--objective {args.objective!r}: choose one of {', '.join(distill.CLI_NAMES)}")
    if args.trajectory_prompts not in distill.CLI_PROMPTS:
        raise GlanceError(f"--trajectory-prompts {args.trajectory_prompts!r}: choose one of "
                          f"{', '.join(distill.CLI_PROMPTS)}")
    layer_names = dict(zip(("recipe", "timestep"), LAYERS))
    if args.layers not in layer_names:
        raise GlanceError(f"--layers {args.layers!r}: choose one of {', '.join(layer_names)}")
    objective = distill.CLI_NAMES[args.objective]
    prompts = distill.CLI_PROMPTS[args.trajectory_prompts]
    distill.check_settings(objective, args.trajectories, args.distill_cfg, args.student_cfg,
                           names={"objective": "--objective", "trajectories": "--trajectories",
                                  "cfg": "--distill-cfg", "student_cfg": "--student-cfg",
                                  "prompts": "--trajectory-prompts"}, prompts=prompts)
    return objective, prompts, layer_names[args.layers]


def _floats(flag, text):
    """Parse a comma-separated list of numbers given to `flag`."""
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise GlanceError(f"{flag} {text!r}: give numbers separated by commas, e.g. 1.0,0.75,0.5,0.25") from None


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "schedule":
            base = _floats("--sigmas", args.sigmas) if args.sigmas else None
            sched = build_schedule(args.family, args.width, args.height, args.mode, base_sigmas=base,
                                   **_step_settings(args))
            print(sched.to_json(indent=args.indent))
        elif args.command == "generate":
            _generate(args)
        elif args.command == "train":
            _train(args)
        else:
            from .lora import read_lora
            lora = read_lora(args.file, args.scale_policy)
            print(json.dumps({"file": lora.path, "layout": lora.layout, "family": lora.family,
                              "namespace": lora.namespace, "modules": len(lora.modules), "ranks": lora.ranks,
                              "scale": lora.scale_note, "ignored": lora.ignored,
                              "glance": None if lora.glance is None else vars(lora.glance)}, indent=2))
    except (GlanceError, ValueError) as e:  # GlanceError names the flag; a library's ValueError is shown as is
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, a vanished file: the environment, not a bug
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
