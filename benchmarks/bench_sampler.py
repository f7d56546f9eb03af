"""GlanceSampler against stock ComfyUI sampling on one real-width Qwen-Image block, on CPU.

Targets (issue 3): Glance 10 steps <= 1.05x a stock 10-step sample with one merged LoRA; >= 4.75x faster
than a stock 50-step sample; peak memory <= stock + 1.1x the pair's size; 20 consecutive generations with
no reload after the first and no memory growth.

    python benchmarks/bench_sampler.py            # about 5 minutes on 2 cores
    python benchmarks/bench_sampler.py --quick    # smaller latent, for a smoke run
"""
import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import psutil
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import comfy_runtime  # noqa: E402
import lora_files as lf  # noqa: E402


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 5 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.stop = psutil.Process(), 0, False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds of the 10-step comparison (default 2)")
    ap.add_argument("--generations", type=int, default=20, help="consecutive generations to check (default 20)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (official Qwen-Image: 32)")
    ap.add_argument("--quick", action="store_true", help="256 px, 1 round, 5 generations")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.size, args.rounds, args.generations = 256, 1, 5

    base_dir = tempfile.mkdtemp(prefix="glance_bench_")
    comfy_runtime.start(base_dir)
    pack = comfy_runtime.load_pack()  # noqa: F841  (registers glance_pack.*)
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from glance_pack.glance_core.families import get_family
    from glance_pack.nodes.loader_node import load_pair
    from glance_pack.nodes.pair import pair_of
    from glance_pack.nodes.sampler_node import GlanceSampler

    comfy.utils.PROGRESS_BAR_ENABLED = False
    print(f"building one Qwen-Image block at real width (3072 / 12288 / 18432), fp32, {torch.get_num_threads()} "
          f"threads ...", flush=True)
    base = comfy_runtime.qwen_block_model()
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    loras = comfy_runtime.loras_dir()
    for phase, seed in (("slow", 1), ("fast", 2)):
        lf.write(os.path.join(loras, f"bench_{phase}.safetensors"),
                 lf.official_qwen_tensors(blocks=1, rank=args.rank, dim=3072, mlp=12288, mod=18432, seed=seed))
    file_bytes = sum(os.path.getsize(os.path.join(loras, f"bench_{p}.safetensors")) for p in ("slow", "fast"))
    glance_model, report = load_pair(base, "bench_slow.safetensors", "bench_fast.safetensors", 1.0, 1.0,
                                     "as trained")
    stock_model, _ = comfy.sd.load_lora_for_models(
        base, None, comfy.utils.load_torch_file(os.path.join(loras, "bench_slow.safetensors")), 1.0, 0)

    ctx = torch.randn(1, 32, 3584, generator=torch.Generator().manual_seed(0))
    pos, neg = [[ctx, {}]], [[ctx * 0, {}]]
    fam = get_family("qwen-image")

    def latent(px):
        return {"samples": torch.zeros(1, 16, 1, px // 8, px // 8)}

    def stock(model, steps_sigmas, px):
        lat = comfy.sample.fix_empty_latent_channels(model, latent(px)["samples"])
        noise = comfy.sample.prepare_noise(lat, 0)
        return comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), steps_sigmas,
                                          pos, neg, lat, seed=0, disable_pbar=True)

    def glance(px):
        return GlanceSampler.execute(model=glance_model, positive=pos, negative=neg, latent_image=latent(px), seed=0,
                                     cfg=1.0, sampler_name="euler", mode="consistent", family="auto", base_steps=50,
                                     slow_steps=5, slow_stride=2, fast_steps=5).result[0]["samples"]

    from glance_pack.glance_core.schedule import build_schedule
    sig10 = torch.tensor(build_schedule("qwen-image", args.size, args.size).sigmas)
    sig50 = torch.tensor(fam.base_sigmas(50, args.size, args.size) + [0.0])

    def timed(fn):
        gc.collect()
        with PeakRSS() as mem:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
        return dt, mem.peak

    res = {"size": args.size, "params_M": params / 1e6, "rank": args.rank, "pair_file_MB": file_bytes / 2**20,
           "threads": torch.get_num_threads(), "rounds": []}
    small = 64  # warm-up size: loads and merges once, so the timed runs compare sampling in a steady state
    for r in range(args.rounds):
        stock(stock_model, torch.tensor(build_schedule("qwen-image", small, small).sigmas), small)
        t_stock, m_stock = timed(lambda: stock(stock_model, sig10, args.size))
        glance(small)
        t_glance, m_glance = timed(lambda: glance(args.size))
        res["rounds"].append({"stock10_s": t_stock, "glance10_s": t_glance, "ratio": t_glance / t_stock,
                              "stock10_peak_MB": m_stock / 2**20, "glance10_peak_MB": m_glance / 2**20})
        print(f"round {r + 1}: stock 10 steps + merged LoRA {t_stock:.2f} s (peak {m_stock / 2**20:.0f} MB) | "
              f"Glance 10 steps {t_glance:.2f} s (peak {m_glance / 2**20:.0f} MB) | ratio {t_glance / t_stock:.3f}",
              flush=True)
    t50, m50 = timed(lambda: stock(base, sig50, args.size))
    print(f"stock 50 steps, base model: {t50:.2f} s (peak {m50 / 2**20:.0f} MB)", flush=True)
    pair = pair_of(glance_model)
    pair_bytes = sum(a.nbytes for a in pair.adapters.values())

    # Consecutive generations: count weight patching and model (re)loads after the first, and RSS.
    patched, loads = [], []
    orig_patch = comfy.model_patcher.ModelPatcher.patch_weight_to_device
    orig_load = comfy.model_patcher.ModelPatcher.load

    def spy_patch(self, key, *a, **k):
        if key in self.patches:
            patched.append(key)
        return orig_patch(self, key, *a, **k)

    def spy_load(self, *a, **k):
        loads.append(1)
        return orig_load(self, *a, **k)
    comfy.model_patcher.ModelPatcher.patch_weight_to_device = spy_patch
    comfy.model_patcher.ModelPatcher.load = spy_load
    gen_px = 128
    rss, times, reloads = [], [], []
    mm.unload_all_models()
    for g in range(args.generations):
        n_before = len(loads)
        t = time.perf_counter()
        glance(gen_px)
        times.append(time.perf_counter() - t)
        reloads.append(len(loads) - n_before)
        gc.collect()
        rss.append(psutil.Process().memory_info().rss / 2**20)
    comfy.model_management.unload_all_models()

    ratios = [r["ratio"] for r in res["rounds"]]
    t_stock10 = statistics.median(r["stock10_s"] for r in res["rounds"])
    t_glance10 = statistics.median(r["glance10_s"] for r in res["rounds"])
    peak_stock = max(r["stock10_peak_MB"] for r in res["rounds"])
    peak_glance = max(r["glance10_peak_MB"] for r in res["rounds"])
    res.update({
        "glance_vs_stock10": statistics.median(ratios), "stock50_s": t50, "stock50_peak_MB": m50 / 2**20,
        "speedup_vs_stock50": t50 / t_glance10, "pair_in_memory_MB": pair_bytes / 2**20,
        "peak_glance_minus_stock_MB": peak_glance - peak_stock,
        "generations": args.generations, "generation_px": gen_px, "reloads_after_first": sum(reloads[1:]),
        "weights_patched": len(patched), "rss_first_MB": rss[0], "rss_last_MB": rss[-1],
        "rss_growth_MB": rss[-1] - rss[0], "gen_time_first_s": times[0], "gen_time_median_s": statistics.median(times),
    })
    print("\n" + report)
    print(f"\nResults ({args.size}x{args.size}, one Qwen-Image block, {params / 1e6:.0f}M params, fp32 CPU, "
          f"{res['threads']} threads, cfg 1):")
    rows = [
        ("Glance 10 / stock 10 + merged LoRA (median)", f"{res['glance_vs_stock10']:.3f}x", "<= 1.05x"),
        ("stock 50 / Glance 10", f"{res['speedup_vs_stock50']:.2f}x", ">= 4.75x"),
        ("peak RSS Glance - stock 10 (MB)", f"{res['peak_glance_minus_stock_MB']:+.0f}",
         f"<= 1.1 x pair = {1.1 * res['pair_in_memory_MB']:.0f}"),
        (f"reloads after the first of {args.generations} generations", str(res["reloads_after_first"]), "0"),
        ("weights patched in those generations", str(res["weights_patched"]), "0"),
        (f"RSS growth over {args.generations} generations (MB)", f"{res['rss_growth_MB']:+.1f}", "~0"),
    ]
    for name, val, target in rows:
        print(f"  {name:55s} {val:>10s}   target {target}")
    print(f"  (stock 10: {t_stock10:.2f} s, Glance 10: {t_glance10:.2f} s, stock 50: {t50:.2f} s; pair "
          f"{res['pair_file_MB']:.1f} MB on disk (bf16), {res['pair_in_memory_MB']:.1f} MB in memory (fp32))")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
