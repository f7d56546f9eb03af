"""The fused LoRA GEMMs (glance_core/fused_gemm.py) through benchmarks/bench_triton_lora.py, in Triton's CPU
interpreter: they must compute x W^T + z U^T + b (the GPU run times them; this keeps them correct between GPU
sessions), and every config compiles for an H100."""
import json
import os
import re
import subprocess
import sys

import pytest

if os.environ.get("CI") == "true":  # CI has it (torch's Linux wheels bring it): missing there is a failure
    import triton  # noqa: F401
else:
    pytest.importorskip("triton", reason="Triton comes with torch's Linux wheels; this torch has none")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "bench_triton_lora.py")


def interpret(*args, code=None):
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, SCRIPT, *args] if code is None else [sys.executable, "-c", code]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 2e-3)])
def test_fused_gemms_match_torch_on_ragged_shapes(dtype, tol):
    # 37 tokens: no multiple of the row tile, so the masked (and TMA zero-padded) edges are exercised.
    r = interpret("--check-only", "--tokens", "37", "--dtype", dtype)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("fused GEMM vs torch"))
    errors = json.loads(line.split(":", 1)[1].strip().replace("'", '"'))
    assert len(errors) == 12  # six layers, two kernels
    assert all(float(e) < tol for e in errors.values()), errors


def test_a_rank_the_kernel_cannot_take_is_refused_by_name():
    code = (f"import sys, torch; sys.path.insert(0, {ROOT!r}); from glance_core import fused_gemm as b\n"
            "x = torch.randn(8, 32)\n"
            "try:\n"
            "    b.lora_linear(x, torch.randn(32, 32), None, torch.randn(8, 24), torch.randn(32, 24))\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    r = interpret(code=code)
    assert r.returncode == 0 and "refused: rank 24" in r.stdout, r.stdout + r.stderr


def test_the_timing_run_goes_through_every_variant():
    # What a GPU session runs, at interpreter size: every variant, the pack's folded branch and the pack with
    # GLANCE_LORA_GEMM set among them (fp16: the dtype the pack hands the kernel; fp32 layers keep the fold).
    r = interpret("--tokens", "37", "--dtype", "fp16", "--iters", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln.split("|")[1].strip() for ln in r.stdout.splitlines() if ln.startswith("| ") and "ms" not in ln]
    assert rows == ["base (cuBLAS)", "folded (the pack)", "triton fused", "triton fused, z given", "triton TMA fused",
                    "triton TMA, z given", "triton TMA, zero branch", "the pack, GLANCE_LORA_GEMM=plain",
                    "the pack, GLANCE_LORA_GEMM=tma"], r.stdout
    # The pack's path with each kernel was checked against the fold before the timing. At 37 tokens the fold
    # copies no weight, so the kernel takes no layer (tests/core/test_fused_gemm.py covers the layers it takes).
    checked = re.findall(r"vs the fold: worst error / output scale (\S+); the kernel took (\d+) of 6", r.stdout)
    assert len(checked) == 2 and all(float(e) < 2e-3 and n == "0" for e, n in checked), r.stdout
    assert "WRONG" not in r.stdout and "GLANCE_LORA_GEMM=plain is set, but" not in r.stdout, r.stdout


def test_every_config_compiles_for_an_h100_with_tensor_cores_and_pipelined_loads():
    # No GPU here: Triton compiles for sm90 all the same (its bundled ptxas), specialised as a real launch.
    r = subprocess.run([sys.executable, SCRIPT, "--compile-sm90"], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if " K=" in ln]
    assert len(rows) == 3 * 5 * 2  # three kernels (plain, TMA, persistent TMA), five tile configs, two K
    for row in rows:
        assert "(fits)" in row, row          # the tile fits an H100's shared memory
        assert "wgmma True" in row, row      # Hopper's tensor-core MMAs, not the older mma.sync
        # the loads overlap the MMAs: async copies in the plain kernel, TMA bulk copies in the others
        assert ("async copies True" if row.startswith("_lora_linear_kernel ") else "TMA True") in row, row
