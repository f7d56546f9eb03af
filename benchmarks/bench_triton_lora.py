"""Experiment (GPU): a Triton GEMM that adds the rank-r LoRA product inside its own accumulator.

    y = x @ W^T + z @ U^T + bias,   z = x @ A^T computed beforehand (rank r, one small GEMM)

Each output tile's fp32 accumulator starts from the rank-r product, then the K loop of x @ W^T runs into it as
in any tiled GEMM, so the output is written once and never read back: what the pack's folded branch cannot
avoid with cuBLAS (a weight copy, about 4 weight-sized passes, or one extra output write and read). Three
versions: plain loads, Hopper TMA loads, and TMA in a persistent kernel. It only pays if the Triton GEMM keeps
up with cuBLAS on the large bf16 product, which only a GPU can tell: this script checks the kernels against
torch and times, on the six image-stream layers of one Qwen-Image block, the layers alone (cuBLAS), the pack's
folded branch, and each kernel (z by cuBLAS, then the fused GEMM), the variants taking turns call by call. It
is not wired into the pack: that waits for a measurement that beats the fold.

    TRITON_PRINT_AUTOTUNING=1 python benchmarks/bench_triton_lora.py   # GPU: 8192 tokens, bf16, autotuned
    TRITON_INTERPRET=1 python benchmarks/bench_triton_lora.py --check-only --tokens 40 --dtype fp32  # CPU check
    TRITON_INTERPRET=1 python benchmarks/bench_triton_lora.py --tokens 40 --dtype fp32 --iters 1  # CPU smoke run
    python benchmarks/bench_triton_lora.py --compile-sm90        # no GPU: compile every config for an H100
"""
import argparse
import os
import sys

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)
from bench_fold import interleaved  # noqa: E402  (the variants take turns call by call)
from glance_core import runtime  # noqa: E402

DIM, MLP, RANK = 3072, 12288, 32
LAYERS = {"to_q": (DIM, DIM), "to_k": (DIM, DIM), "to_v": (DIM, DIM), "to_out": (DIM, DIM),
          "mlp_in": (DIM, MLP), "mlp_out": (MLP, DIM)}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SM90_SHARED = 232448  # bytes of shared memory a block may use on an H100 (227 KiB)


def _configs():
    """Hopper-sized tiles (the autotuner times each once per shape); one small tile under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (256, 128, 64, 3, 8),
                                     (128, 128, 64, 3, 4), (64, 256, 64, 4, 4)]]  # all within sm90's 227 KiB


@triton.jit
def _tile(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets of output tile `tile` in grouped order: GROUP_M row tiles in turn share the W tiles
    they read while those sit in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    rows = min(tiles_m - first_m, GROUP_M)
    return (first_m + (tile % per_group) % rows) * BLOCK_M, ((tile % per_group) // rows) * BLOCK_N


# K is a compile-time constant (two values here): Triton's interpreter cannot loop to a runtime bound with numpy 2.
@triton.autotune(configs=_configs(), key=["M", "N", "K"])
@triton.jit
def _lora_linear_kernel(x_ptr, w_ptr, z_ptr, u_ptr, b_ptr, y_ptr, M, N, K: tl.constexpr,
                        s_xm, s_xk, s_wn, s_wk, s_zm, s_zr, s_un, s_ur, s_ym, s_yn,
                        R: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    off_m, off_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = off_m + tl.arange(0, BLOCK_M)
    rn = off_n + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # The LoRA product first (its loads then overlap the K loop's), from the same accumulator.
    rr = tl.arange(0, R)
    zt = tl.load(z_ptr + rm[:, None] * s_zm + rr[None, :] * s_zr, mask=rm[:, None] < M, other=0.0)
    ut = tl.load(u_ptr + rn[None, :] * s_un + rr[:, None] * s_ur, mask=rn[None, :] < N, other=0.0)
    acc = tl.dot(zt, ut, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        a = tl.load(x_ptr + rm[:, None] * s_xm + k[None, :] * s_xk, mask=(rm[:, None] < M) & (k[None, :] < K),
                    other=0.0)
        b = tl.load(w_ptr + rn[None, :] * s_wn + k[:, None] * s_wk, mask=(rn[None, :] < N) & (k[:, None] < K),
                    other=0.0)
        acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * s_ym + rn[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def _tma_blocks(nargs):
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config being tried."""
    bm, bn, bk, r = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"], nargs["R"]
    for name, shape in (("x_desc", [bm, bk]), ("w_desc", [bn, bk]), ("z_desc", [bm, r]), ("u_desc", [bn, r]),
                        ("y_desc", [bm, bn])):
        nargs[name].block_shape = shape


def _tma_configs(persistent=False):
    configs = _configs()
    if persistent and not INTERPRET:  # the flattened loop buffers one stage more: the 128x256 tiles get 2 stages
        configs = [triton.Config(c.kwargs, num_stages=2 if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 32768
                                 else c.num_stages, num_warps=c.num_warps) for c in configs]
    return [triton.Config(c.kwargs, num_stages=c.num_stages, num_warps=c.num_warps, pre_hook=_tma_blocks)
            for c in configs]


@triton.jit
def _tma_tile(x_desc, w_desc, z_desc, u_desc, b_ptr, y_desc, off_m, off_n, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One output tile through TMA: the rank-R product first, the K loop into the same accumulator, bias, store
    (the descriptors pad out-of-range tiles with zeros and clip the store)."""
    acc = tl.dot(z_desc.load([off_m, 0]), u_desc.load([off_n, 0]).T, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32))
    for k in range(0, K, BLOCK_K):
        acc = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, acc)
    if HAS_BIAS:
        rn = off_n + tl.arange(0, BLOCK_N)
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


@triton.autotune(configs=_tma_configs(), key=["M", "N", "K"])
@triton.jit
def _lora_linear_tma_kernel(x_desc, w_desc, z_desc, u_desc, b_ptr, y_desc, M, N, K: tl.constexpr,
                            R: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # The same GEMM with Hopper's TMA loads: one program per output tile.
    off_m, off_n = _tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _tma_tile(x_desc, w_desc, z_desc, u_desc, b_ptr, y_desc, off_m, off_n, N, K, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)


def _shapes(x, up):
    """(M, K, N, R) of a call, refusing a rank the kernels cannot take."""
    (m, k), (n, r) = x.shape, up.shape
    if r < 16 or r & (r - 1):
        raise ValueError(f"rank {r}: the fused GEMM takes a power of two >= 16 (tl.dot's smallest tile)")
    return m, k, n, r


def _launch_tma(kernel, x, weight, bias, z, up, programs=None):
    """Run a TMA kernel on x, weight, z, up: one program per output tile, or `programs` looping over the tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    m, k, n, r = _shapes(x, up)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)

    def desc(t):
        return TensorDescriptor.from_tensor(t.contiguous(), [16, 16])  # block shape: set per config by _tma_blocks

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles if programs is None else min(programs, tiles),)
    extra = {} if programs is None else {"PROGRAMS": programs}
    kernel[grid](desc(x), desc(weight), desc(z), desc(up), bias if bias is not None else y, desc(y), m, n, k, R=r,
                 HAS_BIAS=bias is not None, **extra)
    return y


def lora_linear_tma(x, weight, bias, z, up):
    """lora_linear with TMA loads and stores (Hopper and newer)."""
    return _launch_tma(_lora_linear_tma_kernel, x, weight, bias, z, up)


@triton.autotune(configs=_tma_configs(persistent=True), key=["M", "N", "K"])
@triton.jit
def _lora_linear_persistent_kernel(x_desc, w_desc, z_desc, u_desc, b_ptr, y_desc, M, N, K: tl.constexpr,
                                   R: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                                   PROGRAMS: tl.constexpr):
    # The TMA GEMM as a persistent kernel: one program per SM walks the tiles, and the flattened loop lets the
    # compiler start the next tile's loads while this tile's epilogue (bias, store) runs.
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N), PROGRAMS, flatten=True):
        off_m, off_n = _tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _tma_tile(x_desc, w_desc, z_desc, u_desc, b_ptr, y_desc, off_m, off_n, N, K, HAS_BIAS, BLOCK_M, BLOCK_N,
                  BLOCK_K)


def lora_linear_persistent(x, weight, bias, z, up):
    """lora_linear_tma as a persistent kernel: one program per SM (a GPU only)."""
    return _launch_tma(_lora_linear_persistent_kernel, x, weight, bias, z, up,
                       programs=torch.cuda.get_device_properties(x.device).multi_processor_count)


def lora_linear(x, weight, bias, z, up):
    """x @ weight^T + z @ up^T + bias in one GEMM (x: (M, K), weight: (N, K), z: (M, R), up: (N, R); R a
    power of two >= 16). Scale already folded into `up`, as the pack's prepared branches have it."""
    m, k, n, r = _shapes(x, up)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _lora_linear_kernel[grid](x, weight, z, up, bias if bias is not None else y, y, m, n, k,
                              x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
                              up.stride(0), up.stride(1), y.stride(0), y.stride(1), R=r, HAS_BIAS=bias is not None)
    return y


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
        lin = torch.nn.Linear(1, 1, device="meta")
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
    fns = {n: fn for n, fn in fns.items() if fn is not None}
    with torch.inference_mode():  # the first calls autotune the kernels, shape by shape
        res = interleaved(fns, args.iters, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "Triton's CPU interpreter (no timing)"
    print(f"\nSix image-stream layers of one Qwen-Image block, {args.tokens} tokens, rank {RANK}, {args.dtype}, "
          f"{where}, {args.iters} calls each, in turns")
    print("| variant | median ms | over base ms | median paired ratio to base |\n|---|---:|---:|---:|")
    for n, (t, ratio) in res.items():
        print(f"| {n} | {t * 1e3:.3f} | {(t - res['base (cuBLAS)'][0]) * 1e3:+.3f} | {ratio:.4f} |")
    for kernel in (_lora_linear_kernel, _lora_linear_tma_kernel, _lora_linear_persistent_kernel):
        for key, cfg in getattr(kernel, "cache", {}).items():  # (M, N, K, dtypes...) -> best config
            print(f"  {kernel.fn.__name__} autotuned for {key}: {cfg}")


if __name__ == "__main__":
    main()
