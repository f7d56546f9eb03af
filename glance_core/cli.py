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
    if not os.path.isdir(args.model):
        raise GlanceError(f"--model {args.model}: no such folder")
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise GlanceError(f"--model {args.model}: not a diffusers pipeline folder (no model_index.json)")
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
    if not args.no_pair and not (args.slow and args.fast):
        raise GlanceError("give --slow and --fast (or --no-pair for the baseline)")
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v <= 0 or v % PIXEL_MULTIPLE:  # checked before the minutes a large pipeline takes to load
            raise GlanceError(f"{flag} {v}: must be a positive multiple of {PIXEL_MULTIPLE} px (8x VAE, 2x2 "
                              "patches)")
    pipe = _load_pipeline(args)
    if not args.no_pair:
        print(load_pair(pipe, args.slow, args.fast, args.scale_policy), file=sys.stderr)
    images = generate(pipe, args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg,
                      guidance_scale=args.guidance, height=args.height, width=args.width, mode=args.mode,
                      generator=torch.Generator(args.device).manual_seed(args.seed),
                      num_images_per_prompt=args.num_images, use_pair=not args.no_pair,
                      **{k: getattr(args, k) for k in DEFAULTS})
    stem, ext = os.path.splitext(args.out)
    for k, img in enumerate(images):
        path = args.out if len(images) == 1 else f"{stem}_{k + 1}{ext or '.png'}"
        img.save(path)
        print(path)


def _train(args):
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm
    from .diffusers_train import train_pair
    from .plan import PairOutput
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
    phases = ("slow", "fast") if args.phases == "both" else (args.phases,)
    # The outputs are checked before the pipeline loads (and again by train_pair before the first step).
    PairOutput(args.out_dir, args.name, phases, args.overwrite, input_name="--name", folder_name="--out-dir").check()
    x = torch.from_numpy(np.asarray(img.resize((w2, h2), Image.BICUBIC), dtype=np.float32) / 255.0)
    pipe = _load_pipeline(args)
    x = x.permute(2, 0, 1)[None].to(args.device)
    bar = tqdm(total=args.steps * len(phases), desc="Glance training")

    def step(phase, i, loss):
        bar.set_postfix(lora=phase, loss=f"{loss:.4f}")
        bar.update()
    try:
        paths = train_pair(pipe, image=x, prompt=args.caption, steps=args.steps, rank=args.rank, alpha=args.alpha,
                           learning_rate=args.lr, caption_dropout=args.caption_dropout, seed=args.seed,
                           phases=phases, out_dir=args.out_dir, name=args.name, overwrite=args.overwrite,
                           on_step=step)
    finally:
        bar.close()
    for p in paths.values():
        print(p)


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "schedule":
            base = [float(x) for x in args.sigmas.split(",")] if args.sigmas else None
            sched = build_schedule(args.family, args.width, args.height, args.mode, base_sigmas=base,
                                   **{k: getattr(args, k) for k in DEFAULTS})
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
    except (GlanceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
