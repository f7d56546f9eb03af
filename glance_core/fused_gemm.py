"""A Triton GEMM that adds a rank-r LoRA product inside its own accumulator (opt-in, GPU):

    y = x @ W^T + z @ U^T + bias,   z = x @ A^T computed beforehand (rank r, one small GEMM)

Each output tile's fp32 accumulator starts from the rank-r product, then the K loop of x @ W^T runs into it,
so the output is written once and never read back, and no weight copy is made: the memory traffic that the
pack's folded branch cannot avoid with cuBLAS. Three variants: plain loads ("plain"), Hopper TMA loads
("tma"), and TMA in a persistent kernel ("persistent"). Whether one beats cuBLAS plus the fold depends on the
Triton GEMM keeping up with cuBLAS on the large product, which only a GPU can tell
(benchmarks/bench_triton_lora.py measures it), so the pack runs it only when GLANCE_LORA_GEMM names a variant
(see runtime.lora_gemm). Needs Triton (torch's Linux wheels bring it); imported only when asked for.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


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
        t = t.contiguous()
        if t.data_ptr() % 16:  # a view at an odd offset: TMA needs a 16-byte aligned base
            t = t.clone()
        return TensorDescriptor.from_tensor(t, [16, 16])  # block shape: set per config by _tma_blocks

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (tiles if programs is None else min(programs, tiles),)
    extra = {} if programs is None else {"PROGRAMS": programs}
    b = bias.contiguous() if bias is not None else y  # (a placeholder pointer without bias)
    kernel[grid](desc(x), desc(weight), desc(z), desc(up), b, desc(y), m, n, k, R=r, HAS_BIAS=bias is not None,
                 **extra)
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
    b = bias.contiguous() if bias is not None else y  # (a placeholder pointer without bias)
    _lora_linear_kernel[grid](x, weight, z, up, b, y, m, n, k,
                              x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), z.stride(0), z.stride(1),
                              up.stride(0), up.stride(1), y.stride(0), y.stride(1), R=r, HAS_BIAS=bias is not None)
    return y


VARIANTS = {"plain": lora_linear, "tma": lora_linear_tma, "persistent": lora_linear_persistent}


def why_not(device, dtype, rank, fin, fout, variant):
    """None when `variant` (a key of VARIANTS, checked by runtime.use_lora_gemm) can compute a layer of `fin` ->
    `fout` features with a rank-`rank` branch on `device` in `dtype`, else the reason it cannot (the layer then
    keeps cuBLAS and the fold)."""
    if device.type != "cuda" and not INTERPRET:
        return f"the layer computes on {device.type}; the fused GEMM runs on CUDA GPUs"
    if variant == "persistent" and INTERPRET:
        return "the persistent variant needs a GPU (the interpreter cannot loop over tiles)"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"the layer computes in {dtype}; the fused GEMM in bfloat16 or float16"
    if rank not in (16, 32):  # the tile sizes are checked to fit an H100's shared memory at rank 32
        return f"rank {rank}: the fused GEMM takes rank 16 or 32"
    if fin % 8 or fout % 8:  # TMA descriptors need 16-byte row strides
        return f"{fin} -> {fout} features: the fused GEMM needs multiples of 8"
    return None


def _define_op():
    """torch.ops.glance.lora_linear(x, weight, bias, z, up, variant): one fused GEMM, opaque to torch.compile
    (inductor calls it as it calls cuBLAS), so a compiled graph keeps it whole."""
    try:
        return torch.ops.glance.lora_linear  # defined already (the pack imported under a second name)
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("glance::lora_linear", mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], z: torch.Tensor,
           up: torch.Tensor, variant: str) -> torch.Tensor:
        return VARIANTS[variant](x, weight, bias, z, up)

    @op.register_fake
    def _(x, weight, bias, z, up, variant):
        return x.new_empty(x.shape[0], weight.shape[0])
    return torch.ops.glance.lora_linear


op = _define_op()
