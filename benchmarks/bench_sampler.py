"""GlanceSampler against stock ComfyUI sampling on Qwen-Image at real width, CPU or GPU, one process.

Side by side, per weight format: base model 10 steps, GlanceSampler with a rank-32 official-layout pair
10 steps, stock sampler with one LoRA merged (ComfyUI's LoraLoader path) 10 steps, base model 50 steps,
the time ComfyUI takes to switch to the merged clone and back, and peak memory of each run. Random
weights (built directly on the device), euler, CFG 5 by default (cond and uncond in one batch).

Targets (issue 11): Glance 10 <= 1.03x stock merged 10 (eager), <= 1.02x (both compiled);
base 50 / Glance 10 >= 4.9x; peak memory <= stock + 1.1x the pair.

    python benchmarks/bench_sampler.py --layers 1 --size 256 --rounds 1           # CPU smoke run
    python benchmarks/bench_sampler.py                                           # CPU, one block, 512 px
    python benchmarks/bench_sampler.py --layers 60 --size 1024 --weights bf16,fp8  # full size (GPU)
    python benchmarks/bench_sampler.py ... --compile   # every model through ComfyUI's torch.compile wrapper
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

WEIGHTS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
           "fp8": (torch.float8_e4m3fn, torch.bfloat16)}  # (storage dtype, manual-cast compute dtype)
DIM, MLP, MOD, CONTEXT = 3072, 12288, 18432, 3584  # Qwen-Image's real widths


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


class PeakCUDA:
    """Peak allocated GPU memory while the block runs."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated()


def steady_allocator():
    """Make glibc keep the memory a model call frees (on Linux): what was set, for the log, or why not.

    By default glibc gives freed activation-sized blocks back to the kernel (an mmap threshold and trimming
    that adapt as the program runs, one arena per thread), so a run that finds its arena trimmed zero-fills
    the pages of its next activations again. In one --threads run of bench_lockstep.py the base run took a
    median 5,679 page faults per model call and the other two runs 1-2: a cost that follows the arena, not
    the work. Call before any other thread allocates. Blocks over 32 MB (glibc's limit) still use mmap."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        return "allocator left as is (not Linux)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return "allocator left as is (no glibc mallopt)"
    settings = {"M_ARENA_MAX": (-8, 1), "M_MMAP_THRESHOLD": (-3, 32 << 20), "M_TRIM_THRESHOLD": (-1, 2**31 - 1)}
    failed = [name for name, (key, value) in settings.items() if mallopt(key, value) != 1]
    if failed:
        raise SystemExit(f"glibc refused mallopt {', '.join(failed)}: the runs could pay page faults unequally")
    return "glibc malloc: one arena, mmap threshold 32 MB, no trimming (freed memory is reused, not refaulted)"


def start_comfy(device, for_compile=False):
    """Start ComfyUI in this process on `device` (tests/comfy_runtime starts it with --cpu). Compiled on a CPU,
    with PyTorch's attention (--use-pytorch-cross-attention, as on a GPU): ComfyUI's CPU default, sub-quadratic
    attention, asks psutil for free memory in every call, a graph break and a recompile whenever it changes."""
    path, where = comfy_runtime.find_comfyui()
    if path is None:
        raise SystemExit(f"{where}: {comfy_runtime.HOW_TO}")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args
    args.cpu = device == "cpu"
    if for_compile and device == "cpu":
        args.use_pytorch_cross_attention = True
    import utils.install_util  # noqa: F401  (before `nodes` shadows ComfyUI's utils package)
    import comfy.model_management as mm  # device state is decided here, from args.cpu
    comfy_runtime.start(tempfile.mkdtemp(prefix="glance_bench_"))  # folders; already-imported devices stay
    args.cpu = device == "cpu"
    return mm


def setup(args, want, formats):
    """Start ComfyUI on `want` with the pack loaded, and write the rank-`args.rank` bench pair into its loras
    folder: (device, loras folder, pack)."""
    mm = start_comfy(want, args.compile)
    device = mm.get_torch_device()
    pack = comfy_runtime.load_pack()  # registers glance_pack.*
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    import comfy.ldm.modules.attention as attention
    log(f"device {device}, weights {formats}, {args.layers} layer(s), {args.size} px, CFG {args.cfg}, "
        f"compile {args.compile}, torch {torch.__version__}, attention {attention.optimized_attention.__name__}")

    loras = comfy_runtime.loras_dir()
    t = time.perf_counter()
    for phase, seed in (("slow", 1), ("fast", 2)):
        lf.write(os.path.join(loras, f"bench_{phase}.safetensors"),
                 lf.official_qwen_tensors(blocks=args.layers, rank=args.rank, dim=DIM, mlp=MLP, mod=MOD, seed=seed))
    log(f"wrote the rank-{args.rank} pair in {time.perf_counter() - t:.1f} s")
    return device, loras, pack


def build_qwen(layers, weights, device, seed=0):
    """ComfyUI's Qwen-Image at real width with `layers` blocks, random weights made on `device` in `weights`."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    config = sm.QwenImage({"image_model": "qwen_image", "num_layers": layers})
    config.set_inference_dtype(*WEIGHTS[weights])  # what ComfyUI does when it loads a checkpoint of this dtype
    model = config.get_model({}, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    make = torch.float32 if weights == "fp32" else torch.bfloat16
    with torch.no_grad():
        for p in model.diffusion_model.parameters():  # scaled so activations stay O(1) through a block
            p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=make)
                    .mul_(0.5 / max(1, p.shape[-1]) ** 0.5))
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def compiled(model):
    """A clone of MODEL going through ComfyUI's own torch.compile wrapper (what TorchCompileModel does)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    m = model.clone()
    set_torch_compile_wrapper(model=m, backend="inductor")
    return m


def merge_probe(adapter, device):
    """What merging an adapter into the weights would cost: one in-dtype addmm pass over every adapted
    weight (seconds), and the fraction of weight elements that merging then unmerging the same delta does
    not give back bit-exactly (what a no-drift merge would have to store or recompute)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    total, changed, elems = 0.0, 0, 0
    for module, entry in adapter._for(device, next(iter(adapter.branches)).weight.dtype).items():
        w = module.weight
        for p in entry.pieces:
            rows = w[p.offset:p.offset + p.length]
            up, down = p.up.to(w.dtype), entry.down[p.r0:p.r1].to(w.dtype)
            sync()
            t = time.perf_counter()
            merged = torch.addmm(rows, up, down)
            sync()
            total += time.perf_counter() - t
            changed += int((torch.addmm(merged, up, down, alpha=-1) != rows).sum())
            elems += rows.numel()
            del merged
    return {"merge_pass_s": total, "roundtrip_mismatch_frac": changed / max(1, elems), "weights": elems}


def consecutive_generations(n, glance, cuda):
    """n Glance generations in a row: model (re)loads and weight patches after the first, memory growth."""
    import comfy.model_patcher as mp
    patched, loads, mem = [], [], []
    orig_patch, orig_load = mp.ModelPatcher.patch_weight_to_device, mp.ModelPatcher.load

    def spy_patch(self, key, *a, **k):
        if key in self.patches:
            patched.append(key)
        return orig_patch(self, key, *a, **k)

    def spy_load(self, *a, **k):
        loads.append(1)
        return orig_load(self, *a, **k)
    mp.ModelPatcher.patch_weight_to_device, mp.ModelPatcher.load = spy_patch, spy_load
    try:
        for g in range(n):
            if g == 1:
                n_loads, n_patched = len(loads), len(patched)
            glance()
            gc.collect()
            mem.append(torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss)
    finally:
        mp.ModelPatcher.patch_weight_to_device, mp.ModelPatcher.load = orig_patch, orig_load
    return {"loads_after_first": len(loads) - n_loads if n > 1 else 0,
            "weights_patched_after_first": len(patched) - n_patched if n > 1 else 0,
            "memory_growth_MiB": (mem[-1] - mem[0]) / 2**20}


def prepare(args, weights, device, loras):
    """The base model (compiled with --compile), its Glance clone with the bench pair, its stock clone with the
    slow LoRA merged (ComfyUI's LoraLoader path), the Glance loader's report, and the runs: name -> callable
    returning the sampled latent (base10, glance10, glance10_separate, glance10_gemm, merged10, base50)."""
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    from glance_pack.glance_core import runtime
    from glance_pack.glance_core.families import get_family
    from glance_pack.glance_core.schedule import build_schedule
    from glance_pack.nodes.loader_node import load_pair
    from glance_pack.nodes.sampler_node import GlanceSampler

    t = time.perf_counter()
    base = build_qwen(args.layers, weights, device)
    params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    log(f"{weights}: built {args.layers} block(s), {params / 1e9:.2f}B params on {device} in "
        f"{time.perf_counter() - t:.1f} s")
    if args.compile:
        base = compiled(base)
    glance_model, report = load_pair(base, "bench_slow.safetensors", "bench_fast.safetensors", 1.0, 1.0,
                                     "as trained")
    stock_model, _ = comfy.sd.load_lora_for_models(
        base, None, comfy.utils.load_torch_file(os.path.join(loras, "bench_slow.safetensors")), 1.0, 0)

    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, args.tokens, CONTEXT, generator=gen)
    pos, neg = [[ctx, {}]], [[torch.randn(1, args.tokens, CONTEXT, generator=gen), {}]]
    px = args.size
    lat = torch.zeros(1, 16, 1, px // 8, px // 8)
    sig10 = torch.tensor(build_schedule("qwen-image", px, px).sigmas)
    sig50 = torch.tensor(get_family("qwen-image").base_sigmas(50, px, px) + [0.0])

    def stock(model, sigmas):
        x = comfy.sample.fix_empty_latent_channels(model, lat)
        noise = comfy.sample.prepare_noise(x, 0)
        return comfy.sample.sample_custom(model, noise, args.cfg, comfy.samplers.sampler_object("euler"), sigmas,
                                          pos, neg, x, seed=0, disable_pbar=True)

    def glance():
        return GlanceSampler.execute(model=glance_model, positive=pos, negative=neg, latent_image={"samples": lat},
                                     seed=0, cfg=args.cfg, sampler_name="euler", mode="consistent", family="auto",
                                     base_steps=50, slow_steps=5, slow_stride=2, fast_steps=5).result[0]["samples"]

    def separate():  # the pack's previous mechanism: every branch added after the layer's own forward
        runtime.fuse = False
        try:
            return glance()
        finally:
            runtime.fuse = True

    def through_gemm():  # the fused Triton GEMM for the folded layers (GLANCE_LORA_GEMM=args.lora_gemm)
        runtime.use_lora_gemm(args.lora_gemm)
        try:
            return glance()
        finally:
            runtime.use_lora_gemm(None)

    runs = {"base10": lambda: stock(base, sig10), "glance10": glance, "glance10_separate": separate,
            "glance10_gemm": through_gemm,
            "merged10": lambda: stock(stock_model, sig10), "base50": lambda: stock(base, sig50)}
    return (base, glance_model, stock_model, report, params), runs


def bench_format(args, weights, device, loras, pack):
    import comfy.model_management as mm
    from glance_pack.nodes.pair import pair_of

    cuda = device.type == "cuda"
    (base, glance_model, stock_model, report, params), every = prepare(args, weights, device, loras)
    glance = every["glance10"]

    def timed(label, fn):
        gc.collect()
        with (PeakCUDA() if cuda else PeakRSS()) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            if cuda:
                torch.cuda.synchronize()
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        if not torch.isfinite(out).all():
            log(f"  note: {label} output has non-finite values (random weights); timing is still valid")
        log(f"  {label}: {dt:.2f} s, peak {mem.peak / 2**30:.2f} GiB, process CPU {cpu:.2f} s")
        return dt, mem.peak, cpu

    def load(model, label):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mm.load_models_gpu([model], force_full_load=True)  # weights made on the device: never a partial load
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        log(f"  {label}: {dt:.2f} s")
        return dt

    runs = {"base10": every["base10"], "glance10": glance}
    if args.separate:
        runs["glance10_separate"] = every["glance10_separate"]
    if args.lora_gemm:
        runs["glance10_gemm"] = every["glance10_gemm"]
    merged = every["merged10"]
    res = {"weights": weights, "params_B": params / 1e9, "rounds": [], "interleaved": args.interleave}
    res["load_base_s"] = load(base, "load base model")
    log("warm-up (base 10, Glance 10; compiles here with --compile)")
    for name, fn in runs.items():
        timed(f"warm-up {name}", fn)
    if args.interleave:  # switching is cheap here: every round runs all of them, against drifting machine load
        load(stock_model, "stock: load the LoRA-merged clone")
        timed("warm-up stock merged 10", merged)
        load(base, "stock: back to the unmerged model")
        # Glance and merged run back to back, in reversed order every other round (Glance, merged, base, ...
        # then ..., base, merged, Glance), so a drift in the machine's speed reaches both alike.
        order = ["glance10", "merged10", "base10"] + [n for n in runs if n not in ("glance10", "base10")]
        for r in range(args.rounds):
            rnd = {}
            for name in order if r % 2 == 0 else order[::-1]:
                if name == "merged10":  # the switches are timed on their own, outside the run
                    res["switch_to_merged_s"] = load(stock_model, "stock: load the LoRA-merged clone")
                    rnd[name] = timed(f"round {r + 1} merged10", merged)
                    res["switch_back_s"] = load(base, "stock: back to the unmerged model")
                else:
                    rnd[name] = timed(f"round {r + 1} {name}", runs[name])
            res["rounds"].append(rnd)
    else:
        for r in range(args.rounds):
            res["rounds"].append({name: timed(f"round {r + 1} {name}", fn) for name, fn in runs.items()})
    if not args.skip_base50:
        res["base50"] = timed("base 50 steps", every["base50"])
    if args.generations:
        res["generations"] = consecutive_generations(args.generations, glance, cuda)
        log(f"  {args.generations} consecutive Glance generations: {res['generations']}")
    if not args.interleave:  # one switch each way (tens of seconds at full size on a GPU)
        res["switch_to_merged_s"] = load(stock_model, "stock: load the LoRA-merged clone")
        timed("warm-up stock merged 10", merged)
        for r, rnd in enumerate(res["rounds"]):
            rnd["merged10"] = timed(f"round {r + 1} merged10", merged)
        if not args.skip_switch_back:
            res["switch_back_s"] = load(base, "stock: back to the unmerged model")

    pair = pair_of(glance_model)
    res["pair_bytes"] = sum(a.nbytes for a in pair.adapters.values())
    if weights != "fp8":
        res["merge_probe"] = merge_probe(pair.adapters["slow"], device)
        log(f"  merge probe (slow LoRA): {res['merge_probe']}")
    keys = [k for k in ("base10", "glance10", "glance10_separate", "glance10_gemm", "merged10")
            if k in res["rounds"][0]]
    med = {k: statistics.median(r[k][0] for r in res["rounds"]) for k in keys}
    peak = {k: max(r[k][1] for r in res["rounds"]) for k in keys}
    res["median_s"], res["peak_bytes"] = med, peak
    res["glance_vs_merged10"] = med["glance10"] / med["merged10"]
    res["per_round_glance_vs_merged10"] = [r["glance10"][0] / r["merged10"][0] for r in res["rounds"]]
    res["paired_glance_vs_merged10"] = paired(res["rounds"], "glance10", "merged10")
    res["paired_glance_vs_base10"] = paired(res["rounds"], "glance10", "base10")
    # Process CPU time (all threads): on a shared CPU machine it leaves out the time other tenants took.
    res["median_cpu_s"] = {k: statistics.median(r[k][2] for r in res["rounds"]) for k in keys}
    res["glance_vs_merged10_cpu"] = res["median_cpu_s"]["glance10"] / res["median_cpu_s"]["merged10"]
    if args.separate:
        res["separate_vs_merged10"] = med["glance10_separate"] / med["merged10"]
        res["separate_vs_merged10_cpu"] = res["median_cpu_s"]["glance10_separate"] / res["median_cpu_s"]["merged10"]
    if "glance10_gemm" in med:
        res["gemm_vs_merged10"] = med["glance10_gemm"] / med["merged10"]
        res["paired_gemm_vs_merged10"] = paired(res["rounds"], "glance10_gemm", "merged10")
        res["paired_gemm_vs_glance10"] = paired(res["rounds"], "glance10_gemm", "glance10")
    res["glance_vs_base10"] = med["glance10"] / med["base10"]
    if "base50" in res:
        res["base50_vs_glance10"] = res["base50"][0] / med["glance10"]
        res["base50_vs_base10"] = res["base50"][0] / med["base10"]
    res["peak_glance_minus_merged_bytes"] = peak["glance10"] - peak["merged10"]
    res["report"] = report
    if args.compile:  # what dynamo did for this format: graph breaks and compiled frames
        from torch._dynamo.utils import counters
        res["dynamo"] = {"graph_breaks": sum(counters["graph_break"].values()),
                         "frames": dict(counters["frames"]), "unique_graphs": counters["stats"]["unique_graphs"]}
        log(f"  dynamo: {res['dynamo']}")
    # Free the device without ComfyUI's unload (which would first copy the whole model to the offload device).
    mm.current_loaded_models.clear()
    del base, glance_model, stock_model, pair
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


# Two-sided 95 % Student t quantiles by degrees of freedom (beyond 30: the normal 1.96).
_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def paired(rounds, a, b):
    """Per-round time ratio a/b: mean, its 95 % confidence interval (t) and median, over the rounds."""
    ratios = [r[a][0] / r[b][0] for r in rounds]
    mean = statistics.fmean(ratios)
    if len(ratios) < 2:
        return {"mean": mean, "ci95": [mean, mean], "median": mean, "n": len(ratios)}
    t = _T95[len(ratios) - 2] if len(ratios) - 1 <= len(_T95) else 1.96
    half = t * statistics.stdev(ratios) / len(ratios) ** 0.5
    return {"mean": mean, "ci95": [mean - half, mean + half], "median": statistics.median(ratios), "n": len(ratios)}


def print_table(args, device, results):
    cols = [r["weights"] for r in results]
    mem = "GPU memory" if device.type == "cuda" else "RSS"
    print(f"\nResults: Qwen-Image {args.layers} block(s) at real width, {args.size}x{args.size}, CFG {args.cfg}, "
          f"euler, rank-{args.rank} official-layout pair, {'compiled' if args.compile else 'eager'}, "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU {torch.get_num_threads()} threads'}")
    gemm = "glance10_gemm" in results[0]["median_s"]
    rows = [("base model, 10 steps", lambda r: f"{r['median_s']['base10']:.2f} s"),
            ("Glance pair, 10 steps (GlanceSampler)", lambda r: f"{r['median_s']['glance10']:.2f} s"),
            ("stock, one LoRA merged, 10 steps", lambda r: f"{r['median_s']['merged10']:.2f} s"),
            ("base model, 50 steps", lambda r: f"{r['base50'][0]:.2f} s" if "base50" in r else "-"),
            ("stock: loading a LoRA-merged clone", lambda r: f"{r['switch_to_merged_s']:.2f} s"),
            ("stock: back to the unmerged model",
             lambda r: f"{r['switch_back_s']:.2f} s" if "switch_back_s" in r else "-"),
            (f"peak {mem}: base 10", lambda r: f"{r['peak_bytes']['base10'] / 2**30:.2f} GiB"),
            (f"peak {mem}: Glance 10", lambda r: f"{r['peak_bytes']['glance10'] / 2**30:.2f} GiB"),
            (f"peak {mem}: merged 10", lambda r: f"{r['peak_bytes']['merged10'] / 2**30:.2f} GiB"),
            ("Glance 10 / merged 10 (target <= 1.03 eager, 1.02 compiled)",
             lambda r: f"{r['glance_vs_merged10']:.3f}x"),
            ("Glance 10 / merged 10, per-round pairs: mean [95 % interval] over n rounds",
             lambda r: "{mean:.3f}x [{ci95[0]:.3f}, {ci95[1]:.3f}] n={n}".format(**r["paired_glance_vs_merged10"])),
            ("Glance 10 / base 10, per-round pairs: mean [95 % interval]",
             lambda r: "{mean:.3f}x [{ci95[0]:.3f}, {ci95[1]:.3f}]".format(**r["paired_glance_vs_base10"])),
            ("Glance 10 / merged 10, process CPU time (CPU runs: other tenants left out)",
             lambda r: f"{r['glance_vs_merged10_cpu']:.3f}x" if device.type == "cpu" else "-"),
            ("Glance 10 / base 10", lambda r: f"{r['glance_vs_base10']:.3f}x"),
            ("previous mechanism (separate branches), 10 steps",
             lambda r: f"{r['median_s']['glance10_separate']:.2f} s" if "glance10_separate" in r["median_s"] else "-"),
            ("previous mechanism / merged 10 (wall; process CPU time)",
             lambda r: f"{r['separate_vs_merged10']:.3f}x"
             + (f"; {r['separate_vs_merged10_cpu']:.3f}x" if device.type == "cpu" else "")
             if "separate_vs_merged10" in r else "-"),
            *([(f"Glance, GLANCE_LORA_GEMM={args.lora_gemm}, 10 steps",
                lambda r: f"{r['median_s']['glance10_gemm']:.2f} s"),
               ("  its / merged 10: median; per-round pairs mean [95 % interval]",
                lambda r: "{:.3f}x; {mean:.3f}x [{ci95[0]:.3f}, {ci95[1]:.3f}]".format(
                    r["gemm_vs_merged10"], **r["paired_gemm_vs_merged10"])),
               ("  its / Glance 10 (cuBLAS and the fold): per-round pairs",
                lambda r: "{mean:.3f}x [{ci95[0]:.3f}, {ci95[1]:.3f}]".format(**r["paired_gemm_vs_glance10"]))]
              if gemm else []),
            ("base 50 / Glance 10 (target >= 4.9)",
             lambda r: f"{r['base50_vs_glance10']:.2f}x" if "base50" in r else "-"),
            ("base 50 / base 10", lambda r: f"{r['base50_vs_base10']:.2f}x" if "base50" in r else "-"),
            ("peak Glance - merged (target <= 1.1 x pair)",
             lambda r: f"{r['peak_glance_minus_merged_bytes'] / 2**20:+.0f} MiB <= "
                       f"{1.1 * r['pair_bytes'] / 2**20:.0f}"),
            ("generations after the first: loads / weights patched (target 0 / 0)",
             lambda r: "{loads_after_first} / {weights_patched_after_first}".format(**r["generations"])
             if "generations" in r else "-"),
            ("memory growth over those generations",
             lambda r: f"{r['generations']['memory_growth_MiB']:+.1f} MiB" if "generations" in r else "-"),
            ("merge probe: one addmm pass over the adapted weights",
             lambda r: f"{r['merge_probe']['merge_pass_s'] * 1e3:.1f} ms" if "merge_probe" in r else "-"),
            ("merge probe: elements not restored exactly by unmerging",
             lambda r: f"{100 * r['merge_probe']['roundtrip_mismatch_frac']:.2f} %" if "merge_probe" in r else "-")]
    print(f"| run | {' | '.join(cols)} |\n|---|{'---:|' * len(cols)}")
    for name, fn in rows:
        print(f"| {name} | {' | '.join(fn(r) for r in results)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="Qwen-Image blocks (real model: 60; default 1)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    ap.add_argument("--weights", default=None,
                    help="comma-separated weight formats among fp32, bf16, fp8 (fp8_e4m3fn cast to bf16), each "
                         "measured in turn; default fp32 on CPU, bf16 on a GPU")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--cfg", type=float, default=5.0, help="CFG scale (default 5: cond and uncond in one batch)")
    ap.add_argument("--tokens", type=int, default=32, help="text tokens of the random conditioning (default 32)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds after the warm-up (default 2)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (official Qwen-Image: 32)")
    ap.add_argument("--compile", action="store_true",
                    help="run every model through ComfyUI's torch.compile wrapper (inductor)")
    ap.add_argument("--skip-base50", action="store_true", help="skip the 50-step base run")
    ap.add_argument("--skip-switch-back", action="store_true", help="skip timing the stock switch back")
    ap.add_argument("--generations", type=int, default=None,
                    help="consecutive Glance generations checked for reloads and memory growth (default 10 on "
                         "CPU, 0 on a GPU)")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                    help="run base, Glance and stock merged in every round, switching the stock merge each round "
                         "(default on CPU; off on a GPU, where one switch takes tens of seconds)")
    ap.add_argument("--separate", action=argparse.BooleanOptionalAction, default=True,
                    help="also time GlanceSampler with every branch added after the layer's own forward (the "
                         "mechanism before fusing; runtime.fuse = False), in the same rounds (default on)")
    ap.add_argument("--lora-gemm", choices=["plain", "tma", "persistent"],
                    help="also time GlanceSampler with the fused Triton GEMM variant (GLANCE_LORA_GEMM; a GPU "
                         "with Triton), in the same rounds")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    want = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if want == "auto":
        want = "cpu"
    formats = (args.weights or ("bf16" if want == "cuda" else "fp32")).split(",")
    bad = [f for f in formats if f not in WEIGHTS]
    if bad:
        raise SystemExit(f"--weights: unknown format(s) {bad}; choose among {list(WEIGHTS)}")
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if os.environ.get("GLANCE_LORA_GEMM"):  # it would reach the plain Glance run too
        raise SystemExit("GLANCE_LORA_GEMM is set: unset it and pass --lora-gemm to time the fused GEMM beside "
                         "cuBLAS and the fold")
    if args.lora_gemm and want != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--lora-gemm: the fused GEMM runs on a CUDA GPU (use --device cuda)")

    if args.interleave is None:
        args.interleave = want != "cuda"
    if args.generations is None:
        args.generations = 0 if want == "cuda" else 10
    device, loras, pack = setup(args, want, formats)
    results = []
    for weights in formats:
        results.append(bench_format(args, weights, device, loras, pack))
        if args.json:  # after each format: a run cut short still leaves its results
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "device": str(device), "results": results}, fh, indent=2)
        print_table(args, device, results)
    print("\n" + results[-1]["report"])


if __name__ == "__main__":
    with torch.inference_mode():
        main()
