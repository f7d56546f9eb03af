"""GlanceSampler against stock ComfyUI sampling in lockstep: one process per run, taking turns model call by call.

On a shared machine the speed drifts by 5-10 % over tens of seconds, more than the 1-3 % this has to resolve,
so runs timed one after another (bench_sampler.py) are timed on different machines. Here each run (Glance 10,
stock merged 10, base 10, optionally the separate-branch mechanism) lives in a process of its own, built as
bench_sampler.py builds it, and a baton passes from process to process after every model call: only one
computes at any time, and the k-th model calls of all runs lie seconds apart. A run's time is its generation's
wall time less the time it waited for the baton. Ratios are taken generation by generation; the table gives
their mean and 95 % interval.

--threads runs them in one process instead, one thread each, so no run gains or loses from the process it landed
in (in separate processes merged 10 and base 10, the same work, differed by up to 4 %). Glance and base then run
on one model's weights, stock merged on a second model built alike (the merge rewrites the weights it runs on).

Every run first makes glibc keep the memory a model call frees (bench_sampler.steady_allocator; --default-malloc
leaves it): by default the allocator gives activation memory back to the kernel in some threads' arenas and not
others, and the run that lands there zero-fills its activations' pages again on every call. The table's header
gives each run's page faults per model call.

    python benchmarks/bench_lockstep.py --layers 1 --size 256 --generations 16            # CPU, eager
    python benchmarks/bench_lockstep.py --layers 1 --size 256 --generations 12 --compile  # compiled
    python benchmarks/bench_lockstep.py --threads --compile --generations 16               # one process
    python benchmarks/bench_lockstep.py --threads --base50 --generations 10                # base 50 / Glance 10
"""
import argparse
import gc
import json
import multiprocessing
import os
import queue as queues
import resource
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampler as bs  # noqa: E402


PER_TURN = {"base50": 5}  # model calls per turn: every run's generation spans the same turns


class Baton:
    """Turn-taking among k processes (or threads: ctx = threading): one semaphore each; a finished one passes
    its turn on for good."""

    def __init__(self, ctx, k):
        self.sems = [ctx.Semaphore(0) for _ in range(k)]
        self.done = ctx.Array("b", k) if hasattr(ctx, "Array") else [0] * k

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
    if not args.default_malloc:
        bs.steady_allocator()
    baton.take(i)
    try:
        # As bench_sampler.py runs: the whole run in inference mode. (A bare torch.inference_mode().__enter__()
        # does not hold: the guard lives on the context object, and leaves with it at once. Before this was
        # found, the per-process runs recorded autograd and Glance took its unfolded training path.)
        with torch.inference_mode():
            device, loras, _ = bs.setup(args, args.device, [args.weights])
            (base, glance_model, stock_model, _, _), runs = bs.prepare(args, args.weights, device, loras)
            import comfy.model_base
            import comfy.model_management as mm
            mm.load_models_gpu([stock_model if role == "merged10" else base], force_full_load=True)
            sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
            meter = Meter(baton, i, sync, PER_TURN.get(role, 1))
            comfy.model_base.BaseModel.apply_model = meter.wrap(comfy.model_base.BaseModel.apply_model,
                                                                lambda: meter)
            queue.put(meter.time(role, runs[role], args.generations))
    finally:
        baton.leave(i)


class Meter:
    """One run's clock: the time each of its model calls took, and the time it waited for its turn (wall and
    process CPU seconds: in --threads mode the process CPU time meanwhile is the other runs' work), and the
    page faults each call took (process-wide: only one run computes at a time)."""

    def __init__(self, baton, i, sync, per_turn=1):
        self.baton, self.i, self.sync, self.per_turn = baton, i, sync, per_turn  # model calls per turn
        self.wall = self.cpu = 0.0
        self.calls, self.faults = [], []

    @staticmethod
    def wrap(apply_model, meter_here):
        """BaseModel.apply_model timed, then passing the turn on (meter_here(): the calling run's Meter)."""
        def in_turns(self, *a, **k):
            m = meter_here()
            f, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            out = apply_model(self, *a, **k)
            m.sync()
            m.calls.append(time.perf_counter() - t)
            m.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)
            if len(m.calls) % m.per_turn == 0:
                c = time.process_time()
                m.wall += m.baton.pass_on(m.i)
                m.cpu += time.process_time() - c
            return out
        return in_turns

    def time(self, role, run, generations):
        """Run `run` for `generations` generations after one warm-up: {role, times, cpu, calls} (each generation's
        wall and process CPU seconds less the waits, and the seconds of every model call, generation by
        generation, and the page faults of every timed model call)."""
        if not torch.is_inference_mode_enabled():  # as users run ComfyUI; else autograd records, unfolded
            raise RuntimeError(f"{role}: not in inference mode; the timings would include autograd's recording")
        times, cpus, calls, faults = [], [], [], []
        for g in range(generations + 1):  # the first is the warm-up (compiles with --compile)
            gc.collect()
            self.wall = self.cpu = 0.0
            self.calls, self.faults = [], []
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            self.sync()
            dt, cpu = time.perf_counter() - t0 - self.wall, time.process_time() - c0 - self.cpu
            bs.log(f"  {role} generation {g}{' (warm-up)' if g == 0 else ''}: {dt:.2f} s "
                   f"(waited {self.wall:.1f} s), process CPU {cpu:.2f} s, {len(self.calls)} model calls")
            if g:
                times.append(dt)
                cpus.append(cpu)
                calls.append(self.calls)
                faults.extend(self.faults)
        return {"role": role, "times": times, "cpu": cpus, "calls": calls, "faults": faults}


def in_threads(args, roles):
    """All runs in this process, one thread each, taking turns model call by model call: {role: its timings}.

    Glance, base (and separate) run on one model; stock merged on a second one built alike, since loading it
    rewrites the weights it runs on."""
    device, loras, _ = bs.setup(args, args.device, [args.weights])
    _, runs = bs.prepare(args, args.weights, device, loras)
    _, runs_b = bs.prepare(args, args.weights, device, loras)  # its own weights for the stock merge
    if args.swap_models:  # Glance and base on the model built second, stock merged on the first
        runs, runs_b = runs_b, runs
    runs["merged10"] = runs_b["merged10"]
    import comfy.model_base
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    baton, mine = Baton(threading, len(roles)), threading.local()
    apply_model = comfy.model_base.BaseModel.apply_model
    comfy.model_base.BaseModel.apply_model = Meter.wrap(apply_model, lambda: mine.meter)
    results, errors = {}, []

    def thread(i, role):
        mine.meter = Meter(baton, i, sync, PER_TURN.get(role, 1))
        baton.take(i)
        try:
            with torch.inference_mode():  # thread-local, as bench_sampler.py runs
                results[role] = mine.meter.time(role, runs[role], args.generations)
        except BaseException as e:  # noqa: BLE001  (reported below, naming the run)
            errors.append((role, e))
        finally:
            baton.leave(i)
    threads = [threading.Thread(target=thread, args=(i, role), name=role, daemon=True)
               for i, role in enumerate(roles)]
    for t in threads:
        t.start()
    bs.log(f"{len(roles)} threads in lockstep in one process: {', '.join(roles)}")
    baton.sems[0].release()
    for t in threads:
        t.join()
    comfy.model_base.BaseModel.apply_model = apply_model
    if errors:
        role, e = errors[0]
        raise SystemExit(f"run {role} failed: {type(e).__name__}: {e}") from e
    return results


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
    ap.add_argument("--threads", action="store_true",
                    help="all runs in this one process, one thread each (Glance and base on one model's weights, "
                         "stock merged on a second model built alike)")
    ap.add_argument("--swap-models", action="store_true",
                    help="with --threads: Glance and base on the model built second, stock merged on the first "
                         "(two copies of the same weights can run at different speeds: run both ways)")
    ap.add_argument("--base50", action="store_true",
                    help="also run the base model for 50 steps, in the same turns (base 50 / Glance 10: target >= 4.9)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's allocator as it is (default: keep freed memory in the process, so no run "
                         "pays page faults for its activations that the others do not; see the faults column)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.swap_models and not args.threads:
        raise SystemExit("--swap-models: only with --threads (each process builds its own models)")
    if args.generations < 2:
        raise SystemExit("--generations: at least 2 (the interval needs two ratios)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.threads and args.separate:  # runtime.fuse is one switch per process: it would reach the Glance run too
        raise SystemExit("--separate needs a process of its own: use it without --threads")
    roles = ["glance10", "merged10", "base10"] + (["glance10_separate"] if args.separate else []) \
        + (["base50"] if args.base50 else [])
    if args.threads and not args.default_malloc:  # before the threads exist (the children set their own)
        bs.log(bs.steady_allocator())
    if args.threads:
        with torch.inference_mode():
            results = in_threads(args, roles)
    else:
        results = in_processes(args, roles)
    report(args, roles, results)


def in_processes(args, roles):
    """Every run in a process of its own, taking turns model call by model call: {role: its timings}."""
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
    return results


def low_quantile_ratio(results, a, b, q=0.2, resamples=2000):
    """Ratio of the q-quantiles of run a's and run b's model-call times, with a bootstrap 95 % interval.

    Another tenant on the machine only ever adds time to a call, so each run's fast calls show its own speed;
    their ratio is far less noisy than the mean of per-pair ratios. The bootstrap resamples whole generations
    (a generation's calls share the machine's state) and keeps the g-th generations of both runs together."""
    import random
    ga, gb = results[a]["calls"], results[b]["calls"]

    def ratio(gens):
        sa, sb = sorted(t for g in gens for t in ga[g]), sorted(t for g in gens for t in gb[g])
        return sa[int(q * (len(sa) - 1))] / sb[int(q * (len(sb) - 1))]
    n, rng = len(ga), random.Random(0)
    boots = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return {"q": q, "ratio": ratio(range(n)), "ci95": [boots[round(0.025 * (resamples - 1))],
                                                       boots[round(0.975 * (resamples - 1))]], "n": n}


def report(args, roles, results):
    """Print the paired ratios (and write them with --json)."""
    n = args.generations
    rounds = [{role: (results[role]["times"][g],) for role in roles} for g in range(n)]
    cpu_rounds = [{role: (results[role]["cpu"][g],) for role in roles} for g in range(n)]
    pairs = [("glance10", "merged10"), ("glance10", "base10"), ("merged10", "base10")]
    pairs += [("glance10_separate", "merged10")] if args.separate else []
    pairs += [("base50", "glance10"), ("base50", "base10")] if args.base50 else []
    table = {f"{a}/{b}": {"wall": bs.paired(rounds, a, b), "cpu": bs.paired(cpu_rounds, a, b)} for a, b in pairs}
    # Model call by model call: the k-th calls of the runs ran one right after the other (seconds apart, not
    # a whole generation), so their ratios see the least of the machine's drift.
    for a, b in pairs:  # pairs whose runs make the same number of calls (base 50 makes five times as many)
        counts = {len(c) for role in (a, b) for c in results[role]["calls"]}
        if len(counts) == 1:
            per_gen = counts.pop()
            call_rounds = [{role: (results[role]["calls"][g][k],) for role in (a, b)}
                           for g in range(n) for k in range(per_gen)]
            table[f"{a}/{b}"]["calls"] = bs.paired(call_rounds, a, b)
            table[f"{a}/{b}"]["fast_calls"] = low_quantile_ratio(results, a, b)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU {torch.get_num_threads()} threads"
    print(f"\nLockstep: Qwen-Image {args.layers} block(s) at real width, {args.size}x{args.size}, CFG {args.cfg}, "
          f"euler, rank-{args.rank} pair, {args.weights}, {'compiled' if args.compile else 'eager'}, {where}, "
          f"{'threads of one process' if args.threads else 'one process each'}"
          f"{' (models swapped: Glance and base on the one built second)' if args.swap_models else ''}, "
          f"{n} generations per run (medians: "
          + ", ".join(f"{role} {statistics.median(results[role]['times']):.2f} s" for role in roles) + "; "
          + ("glibc default allocator" if args.default_malloc else "steady allocator") + ", page faults per model "
          "call, median / mean: " + ", ".join(f"{role} {statistics.median(results[role]['faults']):.0f} / "
                                              f"{statistics.mean(results[role]['faults']):.0f}" for role in roles)
          + ")")
    print("| ratio | per generation, wall: mean [95 % interval] | median | process CPU: mean [95 % interval] "
          "| per model call, wall: mean [95 % interval] (pairs) | median "
          "| fastest 20 % of calls: ratio [95 % bootstrap] |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, r in table.items():
        w, c, k, f = r["wall"], r["cpu"], r.get("calls"), r.get("fast_calls")
        print(f"| {name} | {w['mean']:.3f}x [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] | {w['median']:.3f}x "
              f"| {c['mean']:.3f}x [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] | "
              + (f"{k['mean']:.4f}x [{k['ci95'][0]:.4f}, {k['ci95'][1]:.4f}] ({k['n']}) | {k['median']:.4f}x "
                 f"| {f['ratio']:.4f}x [{f['ci95'][0]:.4f}, {f['ci95'][1]:.4f}] |"
                 if k else "- (the runs make different numbers of calls) | - | - |"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": results, "ratios": table}, fh, indent=2)


if __name__ == "__main__":
    main()
