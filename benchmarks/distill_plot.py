"""Plot of the distillation study: PSNR to the 50-step picture (dB) against the number of trajectories.

Reads the study's runs (docs/distill_study.json, as written from benchmarks/distill_study.py's JSON lines) and
draws one line per (cfg, adapted layers, paths of the caption or caption + empty prompt) of the off-policy runs
sampled at their own cfg (the best run at each point), the two baselines of each cfg as dashed lines and the
goal (1 dB over the better baseline) dotted. PIL only (no matplotlib in the project's environment).

    python benchmarks/distill_plot.py                      # docs/distill_study.json -> docs/distill_tradeoff.png
"""
import argparse
import json
import math
import os
import sys

from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from glance_core.files import atomic_write  # noqa: E402

W, H, L, R, T, B = 980, 620, 80, 330, 50, 60   # canvas and plot margins (px)
LAYER_LABELS = {"attn": "attention", "time": "timestep emb.", "ada": "adaLN"}
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _font(px):
    try:
        return ImageFont.load_default(size=px)
    except TypeError:
        return ImageFont.load_default()


def series(study):
    """{(cfg, layers, data): [(trajectories, psnr)]} of the off-policy velocity-loss runs from one caption sampled
    at their own cfg (the rest are in the study's table), and the baseline lines per cfg."""
    out = {}
    for r in study["runs"]:
        if (r.get("weight", "velocity") != "velocity" or r.get("data", "one") not in ("one", "mix")
                or r["target"] != "path" or r["sample_cfg"] != r["cfg"]):
            continue
        key = (r["cfg"], LAYER_LABELS[r.get("modules", "attn")], r.get("data", "one"))
        out.setdefault(key, {}).setdefault(r["trajectories"], []).append(r["psnr"])
    lines = {}
    for b in study["baselines"]:
        if b["sample_cfg"] == b["cfg"]:
            lines[b["cfg"]] = {"plain 10": b["plain10"][0], "Glance sched.": b["glance10"][0]}
    # several runs at one point (other lr or steps): the best, as a user would pick
    return {k: sorted((n, max(ps)) for n, ps in v.items()) for k, v in out.items() if len(v) > 1}, lines


def draw(study, title):
    """The PIL image of the plot."""
    data, base = series(study)
    ys = [p for pts in data.values() for _, p in pts] + [v for d in base.values() for v in d.values()]
    ys += [max(d.values()) + 1 for d in base.values()]
    lo, hi = math.floor(min(ys)) - 1, math.ceil(max(ys)) + 1
    xs = sorted({n for pts in data.values() for n, _ in pts})
    x0, x1 = math.log2(min(xs)) - 0.3, math.log2(max(xs)) + 0.3
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f, small = _font(16), _font(13)
    px = lambda n: L + (math.log2(n) - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    py = lambda v: T + (hi - v) / (hi - lo) * (H - T - B)  # noqa: E731
    d.rectangle([L, T, W - R, H - B], outline="black")
    for v in range(lo, hi + 1, 2):
        d.line([L - 4, py(v), L, py(v)], fill="black")
        d.text((L - 8, py(v)), f"{v}", fill="black", font=small, anchor="rm")
    for n in xs:
        d.line([px(n), H - B, px(n), H - B + 4], fill="black")
        d.text((px(n), H - B + 8), str(n), fill="black", font=small, anchor="mt")
    d.text(((L + W - R) / 2, H - 22), "trajectories (one caption, log scale)", fill="black", font=f, anchor="mm")
    d.text((18, (T + H - B) / 2), "dB", fill="black", font=f, anchor="mm")
    d.text((W / 2, 22), title, fill="black", font=f, anchor="mm")
    legend_y = T
    for i, ((cfg, layers, source), pts) in enumerate(sorted(data.items())):
        c = COLOURS[i % len(COLOURS)]
        d.line([(px(n), py(p)) for n, p in pts], fill=c, width=3) if len(pts) > 1 else None
        for n, p in pts:
            d.ellipse([px(n) - 4, py(p) - 4, px(n) + 4, py(p) + 4], fill=c)
        d.line([W - R + 15, legend_y + 8, W - R + 40, legend_y + 8], fill=c, width=3)
        d.text((W - R + 46, legend_y), f"cfg {cfg:g}, {layers}, " + ("caption + empty" if source == "mix"
                                                                    else "caption"), fill="black", font=small)
        legend_y += 22
    for i, (cfg, lines) in enumerate(sorted(base.items())):
        c = (90, 90, 90) if i == 0 else (170, 120, 40)
        for name, v in list(lines.items()) + [("goal (+1 dB)", max(lines.values()) + 1)]:
            step = 4 if name.startswith("goal") else 10
            for xa in range(L, W - R, 2 * step):
                d.line([xa, py(v), min(xa + step, W - R), py(v)], fill=c, width=1)
            d.text((W - R + 15, legend_y), f"cfg {cfg:g}: {name} {v:.2f} dB", fill=c, font=small)
            legend_y += 20
    return img


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=os.path.join(HERE, "..", "docs", "distill_study.json"))
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "distill_tradeoff.png"))
    a = ap.parse_args(argv)
    with open(a.study) as fh:
        study = json.load(fh)
    img = draw(study, "Distilled pair on the bundled teacher: PSNR to the 50-step picture, 64 held-out captions")
    atomic_write(a.out, lambda tmp: img.save(tmp, format="PNG"))
    print(a.out)


if __name__ == "__main__":
    main()
