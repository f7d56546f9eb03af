"""The pair's branch cost on the six image-stream layers of one real-width Qwen-Image block, per mechanism.

Side by side in one process, eager and compiled (inductor), on CPU or GPU: the layers alone ("base"), with the
branch added after each layer's own product ("separate", runtime.fuse = False), folded into the product
("folded", the pack's mechanism). bf16 weights, and fp8 weights cast to bf16 each call as ComfyUI's
manual-cast layers do. The variants take turns call by call (so a drift in the machine's speed reaches them
alike); times are medians of --iters calls, ratios the medians of each call's time over the base call beside it.

On the H100 (2026-11-27, docs/gpu/bench_fold_h100.log) a further compiled variant was measured and rejected:
building the merged weight copy as one inductor-fused reduction (W + sum_r up[:, r] down[r, :], 2 weight
passes on paper) cost +8.4 ms per block against +0.67 ms for clone + addmm_.

    python benchmarks/bench_fold.py --device cuda                  # 1024 px, CFG: 8192 image tokens
    python benchmarks/bench_fold.py --device cpu --tokens 512 --iters 3 --dtype fp32   # CPU smoke run
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from glance_core import runtime  # noqa: E402

DIM, MLP, RANK = 3072, 12288, 32
LAYERS = {"to_q": (DIM, DIM), "to_k": (DIM, DIM), "to_v": (DIM, DIM), "to_out": (DIM, DIM),
          "mlp_in": (DIM, MLP), "mlp_out": (MLP, DIM)}


class CastLinear(torch.nn.Linear):
    """Stores its weight in a narrow dtype and casts it to the input's dtype each call (ComfyUI's manual cast)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, *self.cast(x))

    def cast(self, x):
        return self.weight.to(x.dtype), self.bias.to(x.dtype)


runtime.plain_linear(lambda cls: issubclass(cls, CastLinear), lambda m, x: m.cast(x))


def build(storage, compute, device, seed=0):
    """The six layers at real width with random weights, and a rank-32 adapter on each."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cls = CastLinear if storage != compute else torch.nn.Linear
    layers, ad = {}, runtime.Adapter("slow")
    for name, (fin, fout) in LAYERS.items():
        lin = cls(fin, fout, device="meta")
        lin.weight = torch.nn.Parameter((torch.randn(fout, fin, generator=g) / fin ** 0.5).to(device, storage),
                                        requires_grad=False)
        lin.bias = torch.nn.Parameter((torch.randn(fout, generator=g) * 0.01).to(device, storage),
                                      requires_grad=False)
        ad.add(lin, torch.randn(RANK, fin, generator=g) * 0.01, torch.randn(fout, RANK, generator=g) * 0.01, 4.0)
        layers[name] = lin
    return layers, ad


def block(layers, x, h):
    """The block's six adapted products: q/k/v/out on x, the MLP on x then on h (the MLP's hidden width)."""
    return [layers[n](x) for n in ("to_q", "to_k", "to_v", "to_out", "mlp_in")] + [layers["mlp_out"](h)]


def interleaved(fns, iters, device):
    """Per variant: the median call time, and the median of its per-iteration ratio to the first variant.
    Every iteration calls each variant once in turn (in reversed order every other iteration), so a drift in
    the machine's speed reaches all variants alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(2):
            fn()
    times = {name: [] for name in fns}
    for i in range(iters):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):
            sync()
            t = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - t)
    first = next(iter(fns))
    return {name: (statistics.median(ts), statistics.median(a / b for a, b in zip(ts, times[first])))
            for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per call (1024 px with CFG: 2 x 4096)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype (default bf16)")
    ap.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    device = torch.device(args.device)
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    formats = {args.dtype: compute, "fp8 cast": torch.float8_e4m3fn}
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.tokens, DIM, generator=g).to(device, compute)
    h = torch.randn(args.tokens, MLP, generator=g).to(device, compute)
    rows = []
    for fmt, storage in formats.items():
        layers, ad = build(storage, compute, device)
        variants = [("base", None, True), ("separate", ad, False), ("folded", ad, True)]
        modes = [("eager", False)] + ([] if args.no_compile else [("compiled", True)])
        for mode, comp in modes:
            torch._dynamo.reset()
            fns = {}
            for name, adapter, fuse in variants:
                # Dynamo guards on runtime.fuse and on the layers' (branched) classes: the three variants keep
                # a compiled graph each, side by side.
                fn = torch.compile(block, fullgraph=True) if comp else block

                def call(fn=fn, adapter=adapter, fuse=fuse):
                    runtime.fuse = fuse
                    with runtime.active(*(() if adapter is None else (adapter,)), device=device, dtype=compute):
                        return fn(layers, x, h)
                fns[name] = call
            with torch.inference_mode():
                res = interleaved(fns, args.iters, device)
            for name, (t, ratio) in res.items():
                rows.append({"format": fmt, "mode": mode, "variant": name, "ms": t * 1e3, "ratio": ratio})
                print(f"{fmt:8} {mode:8} {name:20} {t * 1e3:8.3f} ms  x{ratio:.4f} of base (paired)", flush=True)
        runtime.fuse = True
    print(f"\nSix image-stream layers of one Qwen-Image block, {args.tokens} tokens, rank {RANK}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; branch cost = variant - base")
    print("| weights | mode | variant | ms | branch cost ms | paired ratio to base |\n|---|---|---|---:|---:|---:|")
    for r in rows:
        base = next(b["ms"] for b in rows if b["format"] == r["format"] and b["mode"] == r["mode"]
                    and b["variant"] == "base")
        print(f"| {r['format']} | {r['mode']} | {r['variant']} | {r['ms']:.3f} | {r['ms'] - base:+.3f} "
              f"| {r['ratio']:.4f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
