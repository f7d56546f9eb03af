"""Glance on a diffusers Qwen-Image transformer: one model with two adapters against the official scripts'
two pipelines (one model copy per LoRA). Peak memory of each in its own process, and the cost of a switch.

    python benchmarks/bench_diffusers.py            # one real-width block (3072 / 12288 / 18432), fp32, CPU
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_variant(variant, layers, size):
    import torch
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import lora_files as lf
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from glance_core import diffusers_glance as dg

    def transformer():
        torch.manual_seed(0)
        return QwenImageTransformer2DModel(num_layers=layers)  # the real widths

    d = tempfile.mkdtemp()
    files = {}
    for phase, seed in (("slow", 1), ("fast", 2)):
        files[phase] = str(lf.write(os.path.join(d, f"{phase}.safetensors"), lf.official_qwen_tensors(
            blocks=layers, rank=32, dim=3072, mlp=12288, mod=18432, seed=seed)))
    pe, pm = torch.randn(1, 16, 3584), torch.ones(1, 16, dtype=torch.long)
    kw = dict(prompt_embeds=pe, prompt_embeds_mask=pm, height=size, width=size, true_cfg_scale=1.0,
              output_type="latent", progress=False, generator=torch.Generator().manual_seed(0))
    out = {}
    t0 = time.perf_counter()
    if variant == "ours":
        pipe = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, transformer())
        dg.load_pair(pipe, files["slow"], files["fast"])
        with torch.no_grad():
            dg.generate(pipe, **kw)
        switches = []
        for name in ["glance_slow", "glance_fast"] * 10:
            t = time.perf_counter()
            pipe.transformer.set_adapters([name])
            switches.append(time.perf_counter() - t)
        out["switch_ms"] = 1000 * sorted(switches)[len(switches) // 2]
    else:  # the official scripts: a pipeline per LoRA, each with its own copy of the model
        pipes = {}
        for phase in ("slow", "fast"):
            pipes[phase] = QwenImagePipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, transformer())
            pipes[phase].load_lora_weights(files[phase], adapter_name=phase)
        with torch.no_grad():
            x = dg.generate(pipes["slow"], **{**kw, "use_pair": False})  # stage 1 on copy 1 ...
            dg.generate(pipes["fast"], **{**kw, "use_pair": False})     # ... stage 2 on copy 2
        del x
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="transformer blocks at real width (default 1)")
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--variant", choices=("ours", "official"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return run_variant(args.variant, args.layers, args.size)
    res = {}
    for v in ("ours", "official"):
        p = subprocess.run([sys.executable, __file__, "--variant", v, "--layers", str(args.layers), "--size",
                            str(args.size)], capture_output=True, text=True, check=True)
        res[v] = json.loads(p.stdout.strip().splitlines()[-1])
        print(v, res[v], flush=True)
    print(f"\nQwen-Image transformer, {args.layers} real-width block(s), fp32 CPU, rank-32 official-layout pair, "
          f"{args.size}x{args.size}:")
    print(f"  peak RSS, one model + two adapters        {res['ours']['peak_rss_mb']:.0f} MB")
    print(f"  peak RSS, official two pipelines          {res['official']['peak_rss_mb']:.0f} MB")
    print(f"  ratio (ours / official)                   {res['ours']['peak_rss_mb'] / res['official']['peak_rss_mb']:.2f}")
    print(f"  adapter switch (set_adapters, median)     {res['ours']['switch_ms']:.2f} ms")


if __name__ == "__main__":
    main()
