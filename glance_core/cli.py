"""Command line: `python -m glance_core schedule ...` and `python -m glance_core inspect FILE`."""
import argparse
import json
import sys

from .errors import GlanceError
from .families import FAMILIES
from .schedule import DEFAULTS, MODES, build_schedule


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
    return p


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "schedule":
            base = [float(x) for x in args.sigmas.split(",")] if args.sigmas else None
            sched = build_schedule(args.family, args.width, args.height, args.mode, base_sigmas=base,
                                   **{k: getattr(args, k) for k in DEFAULTS})
            print(sched.to_json(indent=args.indent))
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
