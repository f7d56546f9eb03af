"""GPU: the fused LoRA GEMM (glance_core/fused_gemm.py) against cuBLAS and the pack's fold.

    y = x @ W^T + z @ U^T + bias,   z = x @ A^T computed beforehand (rank r, one small GEMM)

The kernels start each output tile's fp32 accumulator from the rank-r product and run the K loop of x @ W^T
into it, so the output is written once and no weight copy is made: what the pack's folded branch cannot avoid
with cuBLAS (a weight copy, about 4 weight-sized passes, or one extra output write and read). It only pays if
the Triton GEMM keeps up with cuBLAS on the large bf16 product, which only a GPU can tell. This script checks
each variant against torch (a wrong one is named and left out), then times, on the six image-stream layers of
one Qwen-Image block, the layers alone (cuBLAS), the pack's folded branch, each kernel by itself (z by cuBLAS,
then the fused GEMM; with a zero branch: the Triton GEMM's own speed), and the pack with GLANCE_LORA_GEMM set
to each variant (the path a user turns on), the variants taking turns call by call.

    TRITON_PRINT_AUTOTUNING=1 python benchmarks/bench_triton_lora.py   # GPU: 8192 tokens, bf16, autotuned
    bash .gpu/run.sh sh benchmarks/gpu_fused_gemm.sh   # a GPU session's one call: this, then the sampler
    TRITON_INTERPRET=1 python benchmarks/bench_triton_lora.py --check-only --tokens 40 --dtype fp32  # CPU check
    TRITON_INTERPRET=1 python benchmarks/bench_triton_lora.py --tokens 40 --dtype fp32 --iters 1  # CPU smoke run
    python benchmarks/bench_triton_lora.py --compile-sm90        # no GPU: compile every config for an H100
"""
import argparse
import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_fold import interleaved  # noqa: E402  (the variants take turns call by call)
from glance_core import fused_gemm, runtime  # noqa: E402
from glance_core.fused_gemm import (INTERPRET, _lora_linear_kernel, _lora_linear_persistent_kernel,  # noqa: E402
                                    _lora_linear_tma_kernel, lora_linear, lora_linear_persistent, lora_linear_tma)

DIM, MLP, RANK = 3072, 12288, 32
LAYERS = {"to_q": (DIM, DIM), "to_k": (DIM, DIM), "to_v": (DIM, DIM), "to_out": (DIM, DIM),
          "mlp_in": (DIM, MLP), "mlp_out": (MLP, DIM)}
SM90_SHARED = 232448  # bytes of shared memory a block may use on an H100 (227 KiB)


def compile_for_sm90(k_values=(3072, 12288)):
    """Compile every config of every kernel for an H100 (sm90) here, without a GPU, specialised as a launch on
    the bench's bf16 tensors would be (16-aligned pointers and sizes, unit strides as constants): per config,
    the shared memory it takes and what its code uses: Hopper tensor-core MMAs (wgmma), and pipelined loads
    (async copies, or TMA bulk copies). Catches lowering errors and configs that do not fit before GPU time."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    rows = []
    for kernel in (_lora_linear_kernel, _lora_linear_tma_kernel, _lora_linear_persistent_kernel):
        fn = kernel.fn
        for cfg in kernel.configs:
            kw = cfg.kwargs
            descs = {"x_desc": (kw["BLOCK_M"], kw["BLOCK_K"]), "w_desc": (kw["BLOCK_N"], kw["BLOCK_K"]),
                     "z_desc": (kw["BLOCK_M"], RANK), "u_desc": (kw["BLOCK_N"], RANK),
                     "y_desc": (kw["BLOCK_M"], kw["BLOCK_N"])}
            sig, const, attrs = {}, dict(kw, R=RANK, HAS_BIAS=True), {}
            if "PROGRAMS" in fn.arg_names:
                const["PROGRAMS"] = 132  # an H100 SXM's SMs
            for i, name in enumerate(fn.arg_names):
                if name in descs:
                    sig[name] = "tensordesc<bf16[{},{}]>".format(*descs[name])
                elif name.endswith("_ptr"):
                    sig[name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
                elif name in ("s_xk", "s_wk", "s_zr", "s_ur", "s_yn"):
                    sig[name], const[name] = "constexpr", 1  # the JIT makes integer-1 arguments constants
                elif name in ("M", "N") or name.startswith("s_"):
                    sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
                else:
                    sig[name] = "constexpr"
            for k in k_values:
                compiled = triton.compile(ASTSource(fn, sig, dict(const, K=k), attrs), target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                ptx = compiled.asm["ptx"]
                rows.append({"kernel": fn.__name__, "config": f"{kw} stages {cfg.num_stages} warps {cfg.num_warps}",
                             "K": k, "shared": compiled.metadata.shared, "wgmma": "wgmma.mma_async" in ptx,
                             "async_copies": "cp.async.cg" in ptx, "tma": "cp.async.bulk.tensor" in ptx})
    return rows


def build(device, dtype, tokens, seed=0):
    """The six layers' weights, biases and a rank-32 branch each (scale folded into up), and an input each."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    layers = {}
    for name, (fin, fout) in LAYERS.items():
        layers[name] = {
            "x": torch.randn(tokens, fin, generator=g).to(device, dtype),
            "w": (torch.randn(fout, fin, generator=g) / fin ** 0.5).to(device, dtype),
            "b": (torch.randn(fout, generator=g) * 0.01).to(device, dtype),
            "down": (torch.randn(RANK, fin, generator=g) / fin ** 0.5).to(device, dtype),
            "up": (torch.randn(fout, RANK, generator=g) * 0.05).to(device, dtype)}
    return layers


def check(layers):
    """Each fused GEMM against torch in fp32: ({layer and kernel: worst error / output scale}, [kernels that are
    wrong]). The persistent kernel needs a GPU (the interpreter cannot loop over tiles from a program id)."""
    kernels = (lora_linear, lora_linear_tma) + (() if INTERPRET else (lora_linear_persistent,))
    worst, wrong = {}, []
    for name, t in layers.items():
        z = t["x"] @ t["down"].t()
        branch = z.float() @ t["up"].float().t()
        ref = t["x"].float() @ t["w"].float().t() + t["b"].float() + branch
        # the branch must be there: without it the error is of the branch's size
        no_branch = float(branch.abs().max() / ref.abs().max())
        for kernel in kernels:
            y = kernel(t["x"], t["w"], t["b"], z, t["up"])
            err = float((y.float() - ref).abs().max() / ref.abs().max())
            worst[f"{name} {kernel.__name__}"] = err
            if not err < min(0.02, no_branch / 4) and kernel not in wrong:
                print(f"WRONG: {name}: {kernel.__name__} off by {err:.3g} of the output's scale (the branch alone "
                      f"is {no_branch:.3g}); it is left out of the timing", flush=True)
                wrong.append(kernel)
    return worst, wrong


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per call (1024 px with CFG: 2 x 4096)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--iters", type=int, default=40, help="timed calls per variant (median)")
    ap.add_argument("--check-only", action="store_true", help="only compare the kernel with torch")
    ap.add_argument("--compile-sm90", action="store_true",
                    help="no GPU needed: compile every config for an H100 and report shared memory and the code used")
    args = ap.parse_args()
    if args.compile_sm90:
        for r in compile_for_sm90():
            fits = "fits" if r["shared"] <= SM90_SHARED else "TOO LARGE"
            print(f"{r['kernel']} {r['config']} K={r['K']}: shared {r['shared']} B ({fits}), wgmma {r['wgmma']}, "
                  f"async copies {r['async_copies']}, TMA {r['tma']}")
        return
    device = torch.device("cpu" if INTERPRET else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU, or on a CPU under TRITON_INTERPRET=1 (small layers)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if INTERPRET:
        LAYERS.update({n: (fin // 32, fout // 32) for n, (fin, fout) in LAYERS.items()})  # interpreter: small
    layers = build(device, dtype, args.tokens)
    with torch.inference_mode():
        worst, wrong = check(layers)
    print("fused GEMM vs torch (fp32), worst error / output scale:", {n: f"{e:.2e}" for n, e in worst.items()},
          flush=True)
    if args.check_only:
        if wrong:
            raise SystemExit(f"wrong results from {', '.join(k.__name__ for k in wrong)}")
        return

    torch.backends.cuda.matmul.allow_tf32 = False
    mods = {}
    ad = runtime.Adapter("slow")
    for name, t in layers.items():
        lin = torch.nn.Linear(t["w"].shape[1], t["w"].shape[0], device="meta")
        lin.weight = torch.nn.Parameter(t["w"], requires_grad=False)
        lin.bias = torch.nn.Parameter(t["b"], requires_grad=False)
        ad.add(lin, t["down"], t["up"], 1.0)
        mods[name] = lin

    def base():
        return [torch.nn.functional.linear(t["x"], t["w"], t["b"]) for t in layers.values()]

    def folded():
        with runtime.active(ad, device=device, dtype=dtype):
            return [mods[n](t["x"]) for n, t in layers.items()]

    for t in layers.values():
        t["z"] = t["x"] @ t["down"].t()
        t["z0"], t["u0"] = torch.zeros_like(t["z"]), torch.zeros_like(t["up"])

    def with_gemm(fn, variant):
        def run():
            runtime.use_lora_gemm(variant)
            try:
                return fn()
            finally:
                runtime.use_lora_gemm(None)
        return run

    def triton_variant(kernel, z_given=False, zero=False):
        if kernel in wrong or (kernel is lora_linear_persistent and INTERPRET):
            return None

        def run():
            return [kernel(t["x"], t["w"], t["b"],
                           t["z0"] if zero else t["z"] if z_given else t["x"] @ t["down"].t(),
                           t["u0"] if zero else t["up"]) for t in layers.values()]
        return run
    # "z given" leaves out the small down GEMM; "zero branch" is the Triton GEMM's own speed against cuBLAS.
    fns = {"base (cuBLAS)": base, "folded (the pack)": folded,
           "triton fused": triton_variant(lora_linear), "triton fused, z given": triton_variant(lora_linear, True),
           "triton TMA fused": triton_variant(lora_linear_tma),
           "triton TMA, z given": triton_variant(lora_linear_tma, True),
           "triton TMA, zero branch": triton_variant(lora_linear_tma, zero=True),
           "triton persistent fused": triton_variant(lora_linear_persistent),
           "triton persistent, zero branch": triton_variant(lora_linear_persistent, zero=True)}
    for variant, kernel in fused_gemm.VARIANTS.items():
        if triton_variant(kernel) is not None:
            fns[f"the pack, GLANCE_LORA_GEMM={variant}"] = with_gemm(folded, variant)
    fns = {n: fn for n, fn in fns.items() if fn is not None}
    with torch.inference_mode():  # the pack's path through each kernel gives the fold's result
        ref = folded()
        for name in [n for n in fns if n.startswith("the pack, ")]:
            variant, calls = name.rsplit("=", 1)[1], []
            kernel = fused_gemm.VARIANTS[variant]
            fused_gemm.VARIANTS[variant] = lambda *a: (calls.append(1), kernel(*a))[1]
            try:
                out = fns[name]()
            finally:
                fused_gemm.VARIANTS[variant] = kernel
            err = max(float((y.float() - r.float()).abs().max() / r.float().abs().max()) for y, r in zip(out, ref))
            print(f"{name} vs the fold: worst error / output scale {err:.2e}; the kernel took {len(calls)} of "
                  f"{len(layers)} layers (it takes {runtime.GEMM_MIN_ROWS} rows or more)", flush=True)
            if not err < 0.02:
                print(f"WRONG: {name}: off by {err:.3g} of the output's scale; it is left out of the timing")
                del fns[name]
    with torch.inference_mode():  # the first calls autotune the kernels, shape by shape
        res = interleaved(fns, args.iters, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton's CPU interpreter (no timing)"
    print(f"\nSix image-stream layers of one Qwen-Image block, {args.tokens} tokens, rank {RANK}, {args.dtype}, "
          f"{where}, {args.iters} calls each, in turns")
    print("| variant | median ms | over base ms | median paired ratio to base |\n|---|---:|---:|---:|")
    for n, (t, ratio) in res.items():
        print(f"| {n} | {t * 1e3:.3f} | {(t - res['base (cuBLAS)'][0]) * 1e3:+.3f} | {ratio:.4f} |")
    pack = {n.rsplit("=", 1)[1]: res[n][0] for n in res if n.startswith("the pack, ")}
    if pack:  # what benchmarks/gpu_fused_gemm.sh runs the full-size sampler with
        print(f"fastest pack variant: {min(pack, key=pack.get)}")
    for kernel in (_lora_linear_kernel, _lora_linear_tma_kernel, _lora_linear_persistent_kernel):
        for key, cfg in getattr(kernel, "cache", {}).items():  # (M, N, K, dtypes...) -> best config
            print(f"  {kernel.fn.__name__} autotuned for {key}: {cfg}")


if __name__ == "__main__":
    main()
