"""`python -m glance_shapes demo`: the bundled teacher's demo (see --help)."""
import argparse
import sys

from glance_core.errors import GlanceError

from . import DEFAULT_CAPTION, DEFAULT_CFG, OBJECTIVES

DEMO_HELP = """Proof at small scale, on a CPU in seconds, with nothing downloaded: load the bundled
teacher (a 32x32 pixel-space SD3 MMDiT trained on shape pictures), train a Glance Slow/Fast pair on ONE of its
samples, then render captions the pair never saw three ways (teacher 50 steps, plain 10 steps, Glance pair
10 steps, all guided with --cfg), write them side by side to a PNG and print speed-up, PSNR to the 50-step
picture and caption accuracy (read back from the pixels by the judge in glance_shapes.judge).

captions: colour (red green blue yellow magenta cyan), shape (circle square triangle cross),
position (top-left top-right centre bottom-left bottom-right), background (black gray white).

example:
  python -m glance_shapes demo --caption "blue cross centre on black" --seed 3 --out demo.png
"""


def parser():
    """The command line of the bundled teacher's package."""
    p = argparse.ArgumentParser(prog="python -m glance_shapes",
                                description="Glance on the bundled small teacher (no downloads).")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a pair on the bundled teacher and compare 50 / 10 / Glance 10 steps",
                       formatter_class=argparse.RawDescriptionHelpFormatter, description=DEMO_HELP)
    d.add_argument("--caption", default=DEFAULT_CAPTION,
                   help="caption of the ONE training sample: 'colour shape position on background' "
                        f"(default '{DEFAULT_CAPTION}')")
    d.add_argument("--seed", type=int, default=0, help="noise seed of the training sample (default 0)")
    d.add_argument("--steps", type=int, default=60, help="optimizer steps per LoRA (default 60, the recipe's)")
    d.add_argument("--samples", type=int, default=8, help="held-out captions to render and score (1..64, default 8)")
    d.add_argument("--objective", choices=OBJECTIVES, default=OBJECTIVES[0],
                   help="flow-matching: the paper's loss (default); trajectory: regress the teacher's 50-step path")
    d.add_argument("--cfg", type=float, default=DEFAULT_CFG,
                   help=f"classifier-free guidance for all three ways (default {DEFAULT_CFG:g}, the teacher's; "
                        "1: none)")
    d.add_argument("--out", default="glance_demo.png", help="the comparison grid PNG (default glance_demo.png)")
    d.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    return p


def main(argv=None):
    """Run the command line; returns the exit status (2 for a user error, named, without a traceback)."""
    args = parser().parse_args(argv)
    try:
        if args.threads < 0:
            raise GlanceError(f"--threads {args.threads}: must be 0 (torch's choice) or more")
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        from .demo import run
        run(args.caption, args.seed, args.steps, args.samples, args.out, args.objective, args.cfg)
    except (GlanceError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
