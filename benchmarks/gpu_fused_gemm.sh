#!/bin/sh
# A GPU session's one call for the fused LoRA GEMM (about 8 minutes on an H100, machine start aside):
#  1. benchmarks/bench_triton_lora.py: each kernel checked against torch in bf16, then the six image-stream
#     layers timed with cuBLAS, the fold, each kernel, and the pack with GLANCE_LORA_GEMM set to each variant;
#  2. tests/core/test_fused_gemm.py on the GPU: the pack's layers through each variant in bfloat16, eager and
#     compiled with inductor (fullgraph), against the exact result;
#  3. benchmarks/bench_sampler.py at full size (60 blocks, 1024 px, bf16 and fp8) with the fastest variant,
#     in the same rounds as cuBLAS and the fold, then the stock merged LoRA.
# Here: `bash ../shared/gpu/pack.sh`; then one device run, carry [".gpu"], timeout_s 600:
#   bash .gpu/run.sh sh benchmarks/gpu_fused_gemm.sh
# Logs and JSON go to $OUT (the device run's output folder), else docs/gpu.
out=${OUT:-docs/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
TRITON_PRINT_AUTOTUNING=1 timeout 180 python benchmarks/bench_triton_lora.py --iters 20 > "$out/triton_lora.log" 2>&1
echo "bench_triton_lora: exit $?"
grep -v "^Triton autotuning" "$out/triton_lora.log" | tail -28
best=$(sed -n 's/^fastest pack variant: //p' "$out/triton_lora.log")
if [ -z "$best" ]; then  # cut short (compiling, autotuning): go on with TMA unless it was found wrong
    if grep -qE "WRONG: .*(lora_linear_tma off|GLANCE_LORA_GEMM=tma:)" "$out/triton_lora.log"; then
        echo "the TMA kernel was wrong: see $out/triton_lora.log"; exit 1
    fi
    best=tma
fi
GLANCE_TEST_DEVICE=cuda timeout 80 python -m pytest -q -x tests/core/test_fused_gemm.py > "$out/test_fused_gemm.log" 2>&1
echo "test_fused_gemm on the GPU: exit $?"; tail -3 "$out/test_fused_gemm.log"
timeout 300 python benchmarks/bench_sampler.py --layers 60 --size 1024 --weights bf16,fp8 --no-separate \
    --rounds 3 --skip-base50 --skip-switch-back --lora-gemm "$best" --json "$out/sampler_lora_gemm.json" \
    > "$out/sampler_lora_gemm.log" 2>&1
echo "bench_sampler --lora-gemm $best: exit $?"
grep "^|" "$out/sampler_lora_gemm.log" | tail -32
