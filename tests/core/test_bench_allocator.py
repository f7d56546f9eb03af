"""benchmarks/bench_sampler.steady_allocator, as bench_lockstep.py uses it: memory that a model call frees stays
in the process. By default glibc hands an activation-sized block (here 24 MiB, an MLP activation of one block at
256 px with CFG) back to the kernel when it is freed, at first and then whenever its adapting thresholds say so,
and maps a fresh one next time, whose pages are zero-filled again. In a lockstep run that cost one run ~5,700
page faults per model call that the others did not pay. Each case runs in a process of its own (the setting is
global), the blocks in a thread of their own, as in bench_lockstep.py --threads."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = f"""
import json, sys, threading, psutil, torch
sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r})
import bench_sampler as bs
said = bs.steady_allocator() if sys.argv[1] == "steady" else "default"
proc, drops = psutil.Process(), []
def work():
    for _ in range(6):
        t = torch.empty(6 << 20)  # 24 MiB of float32
        t.fill_(1.0)
        before = proc.memory_info().rss
        del t
        drops.append((before - proc.memory_info().rss) / 2**20)  # MiB given back to the kernel by the free
th = threading.Thread(target=work)
th.start()
th.join()
print(json.dumps({{"said": said, "drops": drops}}))
"""


def run(mode):
    r = subprocess.run([sys.executable, "-c", CODE, mode], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_activations_stay_in_the_process():
    steady, default = run("steady"), run("default")
    assert steady["said"].startswith("glibc malloc: one arena"), steady
    assert all(d < 1 for d in steady["drops"]), steady  # kept: the next block reuses these pages
    # So that this test tells the two apart: glibc's default unmaps the first such block at once. (Then its
    # threshold adapts, and whether a later block is kept depends on what else was freed meanwhile.)
    assert default["drops"][0] > 20, default
