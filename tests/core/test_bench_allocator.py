"""benchmarks/bench_sampler.steady_allocator, as bench_lockstep.py --threads uses it: three threads take turns
running an MLP the size of one block's at 256 px with CFG (a 24 MiB activation allocated and freed each time).
Once warm (8 turns each), none of them may zero-fill fresh pages again. By default glibc hands such blocks back
to the kernel, and the lockstep run that lands there pays ~5,700 page faults per model call that the others do
not. It runs in a process of its own: the setting is global."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = f"""
import json, resource, sys, threading, torch
sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
import bench_sampler as bs
said = bs.steady_allocator() if sys.argv[1] == "steady" else "default"
torch.set_num_threads(1)
w1, w2 = torch.randn(12288, 3072) * 0.02, torch.randn(3072, 12288) * 0.02
ITERS = int(sys.argv[2])
turns = [threading.Semaphore(0) for _ in range(3)]
faults = [[] for _ in range(3)]
def run(i):
    x = torch.randn(512, 3072)
    for _ in range(ITERS):
        turns[i].acquire()
        f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.nn.functional.gelu(x @ w1.t()) @ w2.t()
        faults[i].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
        turns[(i + 1) % 3].release()
threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
for t in threads:
    t.start()
turns[0].release()
for t in threads:
    t.join()
print(json.dumps({{"said": said, "faults": faults}}))
"""


def run(mode, iters=8):
    r = subprocess.run([sys.executable, "-c", CODE, mode, str(iters)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_warm_threads_taking_turns_fault_no_fresh_pages():
    got = run("steady", iters=16)
    assert got["said"].startswith("glibc malloc: one arena"), got
    pages = (24 << 20) // 4096  # one activation's pages
    # The heap grows for the first few turns (small allocations split freed blocks); after that it holds. Here
    # glibc's default kept mapping a fresh 24 MiB block every third turn of every thread to the end.
    warm = [f for per_thread in got["faults"] for f in per_thread[8:-1]]
    assert max(warm) < pages // 20, got["faults"]
