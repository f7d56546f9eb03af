"""The pack's layers through the fused LoRA GEMM (GLANCE_LORA_GEMM), run in Triton's CPU interpreter (float16),
or with GLANCE_TEST_DEVICE=cuda on the GPU (bfloat16, all three variants): the result equals
x W^T + b + scale (x A^T) U^T, the kernel is really called (eager and inside a fullgraph compile), layers it
cannot take keep the fold and say why once, and a bad variable value is refused by name."""
import os
import subprocess
import sys
import textwrap

import pytest

if os.environ.get("CI") == "true":  # CI has it (torch's Linux wheels bring it): missing there is a failure
    import triton  # noqa: F401
else:
    pytest.importorskip("triton", reason="Triton comes with torch's Linux wheels; this torch has none")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA = os.environ.get("GLANCE_TEST_DEVICE") == "cuda"
DEVICE, DTYPE, TOL = ("cuda", "bfloat16", 1e-2) if CUDA else ("cpu", "float16", 2e-3)

SCRIPT = textwrap.dedent("""
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    sys.path.insert(0, {root!r})
    from glance_core import fused_gemm, runtime
    runtime.GEMM_MIN_ROWS = 64  # (1024 in use: rows enough for the image stream, not for a text stream)
    calls = []
    for name, fn in list(fused_gemm.VARIANTS.items()):  # count the kernel's launches
        fused_gemm.VARIANTS[name] = lambda *a, _fn=fn, _n=name: (calls.append(_n), _fn(*a))[1]
    g = torch.Generator().manual_seed(0)
    def layer(fin, fout, rank, ad):
        lin = torch.nn.Linear(fin, fout).to({device!r}, torch.{dtype})
        down, up = torch.randn(rank, fin, generator=g) / fin ** 0.5, torch.randn(fout, rank, generator=g) * 0.1
        ad.add(lin, down, up, 2.0)
        return lin, down, up
    ad = runtime.Adapter("slow")
    layers = [layer(32, 64, 16, ad), layer(64, 32, 32, ad), layer(32, 32, 24, ad)]  # the last: rank 24
    # 2 x 45 rows (ragged against the 16-row tile), over GEMM_MIN_ROWS; 2 rows: under it, the layer keeps
    # cuBLAS and the fold's own small-token path.
    xs = [torch.randn(2, 45, lin.in_features, generator=g).to({device!r}, torch.{dtype}) for lin, _, _ in layers]
    xs.append(torch.randn(2, 1, 32, generator=g).to({device!r}, torch.{dtype}))
    def net(*xs):
        return tuple(lin(x) for (lin, _, _), x in zip(layers + layers[:1], xs))
    def exact(lin, down, up, x):  # float32 from the float16 tensors the layer computes with
        xf, d, u = x.float(), down.to(x).float(), (up * 2.0).to(x).float()
        return xf @ lin.weight.float().t() + lin.bias.float() + (xf @ d.t()) @ u.t()
    with torch.inference_mode():
        want = [exact(*t, x) for t, x in zip(layers + layers[:1], xs)]
        with runtime.active(ad, device=torch.device({device!r}), dtype=torch.{dtype}):
            got = net(*xs)
            eager_calls = list(calls)
            got_c = torch.compile(net, fullgraph=True, backend="inductor")(*xs)  # as ComfyUI compiles
    def errs(outs):
        return " ".join(str(float((y.float() - w).abs().max() / w.abs().max())) for y, w in zip(outs, want))
    print("eager_errors", errs(got))
    print("compiled_errors", errs(got_c))
    print("eager_calls", " ".join(eager_calls))
    print("compiled_calls", " ".join(calls[len(eager_calls):]))
""")


def run(code, env_extra):
    env = dict(os.environ, **env_extra)
    env.pop("TRITON_INTERPRET", None)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


@pytest.mark.parametrize("variant", ["plain", "tma", "persistent"] if CUDA else ["plain", "tma"])
def test_layers_through_the_fused_gemm_equal_the_exact_result(variant):
    if CUDA:
        import torch
        assert torch.cuda.is_available(), "GLANCE_TEST_DEVICE=cuda, but torch sees no CUDA device"
    r = run(SCRIPT.format(root=ROOT, device=DEVICE, dtype=DTYPE), {"GLANCE_LORA_GEMM": variant})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if ln.startswith(("eager_", "compiled_")))
    for key in ("eager_errors", "compiled_errors"):
        errors = [float(e) for e in lines[key].split()]
        assert len(errors) == 4 and all(e < TOL for e in errors), (key, errors, r.stdout)
    # The two layers it can take ran through the kernel at 90 rows, in eager and in the compiled graph; the
    # rank-24 one did not, and the log said why, once; at 2 rows the first layer kept the fold's own path.
    assert lines["eager_calls"].split() == [variant, variant], r.stdout
    assert lines["compiled_calls"].split() == [variant, variant], r.stdout
    said = [ln for ln in r.stdout.splitlines() if ln.startswith("Glance: GLANCE_LORA_GEMM")]
    assert len(said) == 1 and "rank 24" in said[0], r.stdout


def test_an_unknown_variant_is_refused_naming_the_variable():
    r = run(f"import sys; sys.path.insert(0, {ROOT!r}); import glance_core.runtime", {"GLANCE_LORA_GEMM": "fastest"})
    assert r.returncode != 0
    assert "GLANCE_LORA_GEMM='fastest'" in r.stderr and "plain, tma, persistent" in r.stderr, r.stderr


def test_unset_the_kernel_module_is_not_even_imported():
    # CPU users and torch builds without Triton: nothing of it is loaded unless asked for.
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import glance_core.runtime as rt\n"
            "print(rt.lora_gemm, 'glance_core.fused_gemm' in sys.modules, 'triton' in sys.modules)")
    r = run(code, {"GLANCE_LORA_GEMM": ""})
    assert r.returncode == 0 and r.stdout.split() == ["None", "False", "False"], r.stdout + r.stderr
