"""GlanceSampler against stock ComfyUI sampling in lockstep: one process per run, taking turns model call by call.

On a shared machine the speed drifts by 5-10 % over tens of seconds, more than the 1-3 % this has to resolve,
so runs timed one after another (bench_sampler.py) are timed on different machines. Here each run (Glance 10,
stock merged 10, base 10, optionally the separate-branch mechanism) lives in a process of its own, built as
bench_sampler.py builds it, and a baton passes from process to process after every model call: only one
computes at any time, and the k-th model calls of all runs lie seconds apart. A run's time is its generation's
wall time less the time it waited for the baton. Ratios are taken generation by generation; the table gives
their mean and 95 % interval.

    python benchmarks/bench_lockstep.py --layers 1 --size 256 --generations 16            # CPU, eager
    python benchmarks/bench_lockstep.py --layers 1 --size 256 --generations 12 --compile  # compiled
"""
import argparse
import gc
import json
import multiprocessing
import os
import queue as queues
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampler as bs  # noqa: E402


class Baton:
    """Turn-taking among k processes: one semaphore each; a finished process passes its turn on for good."""

    def __init__(self, ctx, k):
        self.sems = [ctx.Semaphore(0) for _ in range(k)]
        self.done = ctx.Array("b", k)

    def _next(self, i):
        k = len(self.sems)
        return next((j for j in ((i + d) % k for d in range(1, k)) if not self.done[j]), None)

    def take(self, i):
        self.sems[i].acquire()

    def pass_on(self, i):
        """Give the turn to the next live process and wait for it to come back: the seconds waited."""
        j = self._next(i)
        if j is None:
            return 0.0
        self.sems[j].release()
        t = time.perf_counter()
        self.sems[i].acquire()
        return time.perf_counter() - t

    def leave(self, i):
        self.done[i] = 1
        j = self._next(i)
        if j is not None:
            self.sems[j].release()


def child(i, role, baton, args, queue):
    """Build the models and time `role` for args.generations generations (after one warm-up), in turns."""
    baton.take(i)
    try:
        torch.inference_mode().__enter__()  # as bench_sampler.py runs (the whole process)
        device, loras, _ = bs.setup(args, "cpu" if args.device == "cpu" else "cuda", [args.weights])
        (base, glance_model, stock_model, _, _), runs = bs.prepare(args, args.weights, device, loras)
        import comfy.model_base
        import comfy.model_management as mm
        mm.load_models_gpu([stock_model if role == "merged10" else base], force_full_load=True)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        waited = [0.0]
        apply_model = comfy.model_base.BaseModel.apply_model

        def in_turns(self, *a, **k):
            out = apply_model(self, *a, **k)
            sync()
            waited[0] += baton.pass_on(i)
            return out
        comfy.model_base.BaseModel.apply_model = in_turns
        times, cpus = [], []
        for g in range(args.generations + 1):  # the first is the warm-up (compiles with --compile)
            gc.collect()
            waited[0] = 0.0
            t0, c0 = time.perf_counter(), time.process_time()
            runs[role]()
            sync()
            dt, cpu = time.perf_counter() - t0 - waited[0], time.process_time() - c0
            bs.log(f"  {role} generation {g}{' (warm-up)' if g == 0 else ''}: {dt:.2f} s "
                   f"(waited {waited[0]:.1f} s), process CPU {cpu:.2f} s")
            if g:
                times.append(dt)
                cpus.append(cpu)
        queue.put({"role": role, "times": times, "cpu": cpus})
    finally:
        baton.leave(i)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=1, help="Qwen-Image blocks (default 1)")
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--weights", default="fp32", choices=list(bs.WEIGHTS), help="weight format (default fp32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")
    ap.add_argument("--cfg", type=float, default=5.0, help="CFG scale (default 5: cond and uncond in one batch)")
    ap.add_argument("--tokens", type=int, default=32, help="text tokens of the random conditioning (default 32)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (official Qwen-Image: 32)")
    ap.add_argument("--generations", type=int, default=12, help="timed generations per run (default 12)")
    ap.add_argument("--compile", action="store_true", help="every model through ComfyUI's torch.compile wrapper")
    ap.add_argument("--separate", action="store_true",
                    help="also run the separate-branch mechanism (runtime.fuse = False) in its own process")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.generations < 2:
        raise SystemExit("--generations: at least 2 (the interval needs two ratios)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    roles = ["glance10", "merged10", "base10"] + (["glance10_separate"] if args.separate else [])
    ctx = multiprocessing.get_context("spawn")
    baton, queue = Baton(ctx, len(roles)), ctx.Queue()
    procs = [ctx.Process(target=child, args=(i, role, baton, args, queue), name=role)
             for i, role in enumerate(roles)]
    for p in procs:
        p.start()
    bs.log(f"{len(roles)} processes in lockstep: {', '.join(roles)}")
    baton.sems[0].release()
    results = {}
    while len(results) < len(roles):
        failed = [p for p in procs if p.exitcode not in (None, 0)]
        if failed:
            for p in procs:
                p.terminate()
            raise SystemExit(f"run {failed[0].name} failed (exit code {failed[0].exitcode}); see its error above")
        try:
            r = queue.get(timeout=1.0)
            results[r["role"]] = r
        except queues.Empty:  # keep watching the processes
            pass
    for p in procs:
        p.join()

    n = args.generations
    rounds = [{role: (results[role]["times"][g],) for role in roles} for g in range(n)]
    cpu_rounds = [{role: (results[role]["cpu"][g],) for role in roles} for g in range(n)]
    pairs = [("glance10", "merged10"), ("glance10", "base10"), ("merged10", "base10")]
    pairs += [("glance10_separate", "merged10")] if args.separate else []
    table = {f"{a}/{b}": {"wall": bs.paired(rounds, a, b), "cpu": bs.paired(cpu_rounds, a, b)} for a, b in pairs}
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU {torch.get_num_threads()} threads"
    print(f"\nLockstep: Qwen-Image {args.layers} block(s) at real width, {args.size}x{args.size}, CFG {args.cfg}, "
          f"euler, rank-{args.rank} pair, {args.weights}, {'compiled' if args.compile else 'eager'}, {where}, "
          f"{n} generations per run (medians: "
          + ", ".join(f"{role} {statistics.median(results[role]['times']):.2f} s" for role in roles) + ")")
    print("| ratio | wall: mean [95 % interval] | median | process CPU: mean [95 % interval] |\n|---|---:|---:|---:|")
    for name, r in table.items():
        w, c = r["wall"], r["cpu"]
        print(f"| {name} | {w['mean']:.3f}x [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] | {w['median']:.3f}x "
              f"| {c['mean']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": results, "ratios": table}, fh, indent=2)


if __name__ == "__main__":
    main()
