"""GlanceTrainLoRAPair against a bare PyTorch LoRA training step, on one real-width Qwen-Image block, CPU.

Targets (issue 4): per-step time <= 1.10x the bare step (same model, targets, rank, sigma list); peak
memory with gradient checkpointing reported against the model's own size; training both LoRAs in one run
never holds two copies of the base model.

    python benchmarks/bench_train.py             # about 3 minutes on 2 cores
    python benchmarks/bench_train.py --quick
    python benchmarks/bench_train.py --memory    # issue 12: where training memory goes, per block and
                                                 # projected to Qwen-Image's 60 blocks at 1024 px (about 1 min)
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import psutil
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import comfy_runtime  # noqa: E402
from bench_sampler import PeakRSS  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--steps", type=int, default=8, help="training steps per measurement (default 8)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the side-by-side comparison (default 2)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="4 steps, 1 round")
    ap.add_argument("--memory", action="store_true", help="only the per-block memory table and its projection")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 4, 1

    comfy_runtime.start(tempfile.mkdtemp(prefix="glance_bench_train_"))
    comfy_runtime.load_pack()
    import comfy.utils
    from glance_pack.glance_core.schedule import build_schedule
    from glance_pack.nodes.train_node import train_pair
    from glance_pack.nodes.training import materialise, training_targets
    stand_ins = comfy_runtime.stand_ins()
    comfy.utils.PROGRESS_BAR_ENABLED = False

    print("building one Qwen-Image block at real width, fp32 ...", flush=True)
    model = comfy_runtime.qwen_block_model()
    if args.memory:
        return memory_table(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    vae = stand_ins.tiny_vae("qwen-image")
    image = torch.rand(1, args.size, args.size, 3, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 32, 3584, generator=torch.Generator().manual_seed(1))
    pos = [[ctx, {}]]
    sigmas = build_schedule("qwen-image", args.size, args.size).phase_sigmas("slow")
    alpha = 4.0 * args.rank

    # ---- ours: the node's own function, timed per step through the progress hook ----
    stamps = []
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: stamps.append(time.perf_counter()))

    def ours(checkpointing, phases="slow only", name="b"):
        stamps.clear()
        with PeakRSS() as mem, torch.inference_mode():
            train_pair(model, vae, image, pos, None, name, args.steps, 1e-4, args.rank, alpha, 0.0, 0, "fp32",
                       args.size, phases, checkpointing, True, False, -1)
        steps = [b - a for a, b in zip(stamps, stamps[1:])]
        return statistics.median(steps), mem.peak

    # ---- bare PyTorch: the same LoRA math on the same layers, called directly ----
    def bare():
        dm = model.model.diffusion_model
        with torch.inference_mode(False), torch.enable_grad():
            materialise(model.model)
            gen = torch.Generator().manual_seed(0)
            params, originals = [], []
            for _, _, key, off, length in training_targets(model, "qwen-image"):
                lin = comfy.utils.get_attr(model.model, key[:-len(".weight")])
                a = torch.nn.Parameter(torch.randn(args.rank, lin.weight.shape[1], generator=gen) / args.rank)
                b = torch.nn.Parameter(torch.zeros(lin.weight.shape[0], args.rank))
                params += [a, b]
                originals.append((lin, lin.forward))
                lin.forward = (lambda x, lin=lin, a=a, b=b:
                               F.linear(x, lin.weight, lin.bias) + (alpha / args.rank) * F.linear(F.linear(x, a), b))
            opt = torch.optim.AdamW(params, lr=1e-4)
            with torch.inference_mode():
                x0 = model.model.process_latent_in(vae.encode(image)).clone()
            x0 = x0.clone()
            context = ctx.clone()
            sig = torch.tensor(sigmas)
            times = []
            try:
                with PeakRSS() as mem:
                    for i in range(args.steps):
                        t = time.perf_counter()
                        s = sig[torch.randint(len(sig), (1,), generator=gen)]
                        noise = torch.randn(x0.shape, generator=gen)
                        xt = (1 - s) * x0 + s * noise
                        v = dm(xt, s, context=context)
                        loss = F.mse_loss(v.float(), noise - x0)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        torch.nn.utils.clip_grad_norm_(params, 1.0)
                        opt.step()
                        times.append(time.perf_counter() - t)
            finally:
                for lin, fwd in originals:
                    lin.forward = fwd
        return statistics.median(times[1:] if len(times) > 2 else times), mem.peak

    rows = []
    for r in range(args.rounds):
        tb, mb = bare()
        to, mo = ours(False)
        rows.append((tb, to, mb, mo))
        print(f"round {r + 1}: bare step {tb:.3f} s (peak {mb / 2**20:.0f} MB) | GlanceTrainLoRAPair step {to:.3f} s "
              f"(peak {mo / 2**20:.0f} MB) | ratio {to / tb:.3f}", flush=True)
    tg, mg = ours(True)
    print(f"with gradient checkpointing: step {tg:.3f} s, peak {mg / 2**20:.0f} MB", flush=True)
    base_rss = psutil.Process().memory_info().rss
    tboth, mboth = ours(True, "both", "both")
    comfy.utils.set_progress_bar_global_hook(None)

    ratio = statistics.median(to / tb for tb, to, _, _ in rows)
    print(f"\nResults ({args.size}x{args.size}, one Qwen-Image block, {model_bytes / 2**20:.0f} MB of fp32 weights, "
          f"rank {args.rank}, 12 module types, {args.steps} steps, {torch.get_num_threads()} threads):")
    print(f"  GlanceTrainLoRAPair step / bare PyTorch step (median)   {ratio:.3f}x   target <= 1.10x")
    print(f"  peak RSS, no checkpointing                               {max(r[3] for r in rows) / 2**20:.0f} MB")
    print(f"  peak RSS, gradient checkpointing                         {mg / 2**20:.0f} MB "
          f"(model weights {model_bytes / 2**20:.0f} MB)")
    print(f"  peak RSS training both LoRAs in one run                  {mboth / 2**20:.0f} MB "
          f"(process before: {base_rss / 2**20:.0f} MB; two model copies would add {model_bytes / 2**20:.0f} MB)")
    print(f"  step with checkpointing / without                        {tg / statistics.median(r[1] for r in rows):.2f}x")


def memory_table(model, blocks=60, size=1024, text_tokens=256, vram=(24, 12)):
    """Measure each part of one block's training memory (CPU, fp32, rank 32) and project it to the full model."""
    from glance_pack.glance_core import memory, runtime
    from glance_pack.glance_core.train import frozen
    from glance_pack.nodes.training import build_adapter, materialise, trainable_blocks, training_targets
    GiB = memory.GiB
    dm = model.model.diffusion_model
    block = dm.transformer_blocks[0]
    block_w = sum(p.numel() for p in block.parameters())
    other_w = sum(p.numel() for p in dm.parameters()) - block_w
    rank, width = 32, 3072
    ctx = torch.randn(1, 32, 3584, generator=torch.Generator().manual_seed(1))
    saved = {}
    with torch.inference_mode(False), torch.enable_grad(), frozen(dm):
        materialise(model.model)
        adapter, _ = build_adapter(model, training_targets(model, "qwen-image"), rank, 4.0 * rank, "slow",
                                   torch.float32, torch.Generator().manual_seed(0))
        lora_params = sum(p.numel() for p in adapter.parameters())
        for px in (256, 384):
            x = torch.randn(1, 16, 1, px // 8, px // 8, generator=torch.Generator().manual_seed(2))
            for ckpt in (False, True):
                with trainable_blocks(dm, ckpt, clone_saved=False), runtime.active(adapter), \
                        memory.SavedBytes(dm) as sb:
                    out = dm(x, torch.tensor([0.5]), context=ctx)
                    out.float().square().mean().backward()
                saved[px, ckpt] = ((px // 16) ** 2 + ctx.shape[1], sb.total)
    fits = {ck: memory.fit_linear_quadratic(*saved[256, ck], *saved[384, ck]) for ck in (False, True)}
    per_tw = {ck: fits[ck][0] / (width * 4) for ck in fits}  # bytes per token, width unit, compute-dtype byte
    print(f"\nMeasured on one real-width Qwen-Image block, fp32, rank {rank} (CPU):")
    print(f"  block weights            {block_w * 4 / 2**20:8.0f} MiB fp32 ({block_w / 1e6:.0f} M parameters)")
    print(f"  LoRA + grads + AdamW     {lora_params * 16 / 2**20:8.1f} MiB ({lora_params / 1e6:.2f} M parameters)")
    for ck in (False, True):
        (t1, b1), (t2, b2) = saved[256, ck], saved[384, ck]
        print(f"  activations, {'checkpointed' if ck else 'no checkpointing'}: {b1 / 2**20:.1f} MiB at {t1} tokens, "
              f"{b2 / 2**20:.1f} MiB at {t2} tokens -> {per_tw[ck]:.2f} bytes per token x width x dtype byte, "
              f"quadratic part {fits[ck][1]:.1f} bytes per token^2")
    print(f"  (constants used by the node's estimate: {memory.BLOCK_SAVED_PER_TOKEN_WIDTH}, "
          f"{memory.CHECKPOINT_SAVED_PER_TOKEN_WIDTH})")

    tokens = (size // 16) ** 2 + text_tokens
    print(f"\nProjection: {blocks} blocks, {size}x{size} ({tokens} tokens with {text_tokens} text tokens), "
          f"rank {rank}, bf16 compute, gradient checkpointing (flash attention on a GPU keeps no token^2 part; "
          "fp8 adds the recomputed block's bf16 weight copies):")
    acts = blocks * per_tw[True] * tokens * width * 2 + per_tw[False] * tokens * width * 2
    acts_nockpt = blocks * per_tw[False] * tokens * width * 2
    lora = blocks * lora_params * 16
    print(f"  {'weights':>12} {'weights GiB':>12} {'LoRA+opt GiB':>13} {'activations GiB':>16} {'peak GiB':>9}")
    for name, bytes_per in (("bf16", 2), ("fp8_e4m3fn", 1)):
        w = (blocks * block_w + other_w) * bytes_per
        a = acts + (block_w * 2 if bytes_per != 2 else 0)  # the recomputed block's bf16 weight copies
        print(f"  {name:>12} {w / GiB:12.1f} {lora / GiB:13.2f} {a / GiB:16.2f} {(w + lora + a) / GiB:9.1f}")
    print(f"  (without checkpointing the activations alone would be {acts_nockpt / GiB:.0f} GiB)")
    w8 = (blocks * block_w + other_w)
    for card in vram:
        room = card * GiB * 0.95 - lora - acts - block_w * 2  # ComfyUI keeps some back for the CUDA context
        streamed = max(0.0, w8 - room)
        # Streamed layers cross PCIe once in forward, once in the checkpoint recomputation, once in backward.
        print(f"  fp8 on a {card} GiB card with partial loading: {max(0.0, room) / GiB:.1f} GiB of weights stay, "
              f"{streamed / GiB:.1f} GiB streamed per pass, about {3 * streamed / (25e9):.1f} s a step extra at "
              "25 GB/s PCIe")


if __name__ == "__main__":
    main()
