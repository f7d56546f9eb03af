"""What one LoRA training run keeps in memory, estimated before the first step and measured by the benchmark.

The parts: the base weights on the device (ComfyUI decides how much of them it loads), the LoRA being trained
(float32 parameters, their gradients and AdamW's two moments: 16 bytes a parameter; the other LoRA of the pair
waits on the CPU), and the activations autograd keeps for backward. With gradient checkpointing those are each
block's inputs plus one block recomputed at a time; without it, every block's. Activations grow linearly with
the tokens (flash or memory-efficient attention, as on a GPU, keeps no tokens x tokens matrix).
"""
from dataclasses import dataclass

import torch

from .errors import GlanceError

GiB = 2 ** 30
LORA_BYTES_PER_PARAM = 4 + 4 + 8  # float32 parameter, its gradient, AdamW exp_avg and exp_avg_sq
# Bytes kept for backward per token, per unit of model width, per byte of the compute dtype, for ONE block
# run without checkpointing; and the block inputs kept per block with checkpointing (the image and text
# streams, as copies: the recomputation must start from unmodified inputs). Measured on one real-width
# Qwen-Image block by `benchmarks/bench_train.py --memory` (linear part of a two-size fit: 27.3 and 0.84).
BLOCK_SAVED_PER_TOKEN_WIDTH = 28.0
CHECKPOINT_SAVED_PER_TOKEN_WIDTH = 1.0


@dataclass(frozen=True)
class TrainingMemory:
    """An estimate in bytes of what one training run holds on its device, part by part."""
    weights: int        # base weights the device keeps loaded
    offloaded: int      # base weights left on the CPU and streamed per layer (ComfyUI partial loading)
    lora: int           # the LoRA being trained: parameters, gradients, optimizer state
    activations: int    # kept for backward at the peak

    @property
    def total(self):
        """Bytes on the device at the peak."""
        return self.weights + self.lora + self.activations

    def describe(self):
        """One line for the log and the progress text."""
        off = f", {size(self.offloaded)} of weights offloaded to the CPU" if self.offloaded else ""
        return (f"about {size(self.total)}: weights {size(self.weights)}{off}, LoRA and optimizer "
                f"{size(self.lora)}, activations {size(self.activations)}")


def size(n):
    """Bytes for people: GiB, or MiB below one GiB."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def activation_bytes(tokens, width, blocks, compute_bytes, checkpointing, cast_block_bytes=0):
    """Bytes kept for backward: activations of `tokens` (image + text) through `blocks` blocks `width` wide, plus
    the compute-dtype copies of weights stored otherwise (fp8, GGUF, fp32 under autocast: `cast_block_bytes` a
    block), which backward needs for the input gradient; with checkpointing only one block's of each."""
    per_block = BLOCK_SAVED_PER_TOKEN_WIDTH * tokens * width * compute_bytes + cast_block_bytes
    if checkpointing:
        return int(blocks * CHECKPOINT_SAVED_PER_TOKEN_WIDTH * tokens * width * compute_bytes + per_block)
    return int(blocks * per_block)


def lora_bytes(lora_params):
    """Bytes of one trainable LoRA of `lora_params` parameters with its gradients and AdamW state."""
    return int(lora_params * LORA_BYTES_PER_PARAM)


def plan_memory(model_bytes, loaded_bytes, lora_params, tokens, width, blocks, compute_bytes, checkpointing,
                cast_block_bytes, free_bytes, min_weights_bytes=0):
    """Fit a run into `free_bytes` of device memory (beyond what the model has loaded already; math.inf: the
    estimate alone, nothing streamed or refused).

    Everything but the weights must fit; the weights fill what is left (ComfyUI streams the rest from the CPU,
    at least `min_weights_bytes` stay, e.g. the layers it cannot offload). Raises GlanceError when even that
    does not fit. Returns a TrainingMemory.
    """
    lora = lora_bytes(lora_params)
    acts = activation_bytes(tokens, width, blocks, compute_bytes, checkpointing, cast_block_bytes)
    room = free_bytes + loaded_bytes - lora - acts
    if room < min_weights_bytes:
        need = lora + acts + min_weights_bytes
        raise GlanceError(
            f"training needs about {need / GiB:.1f} GiB of device memory beyond the model weights it can stream "
            f"(LoRA and optimizer {lora / GiB:.2f} GiB, activations {acts / GiB:.1f} GiB at {tokens} tokens), and "
            f"{(free_bytes + loaded_bytes) / GiB:.1f} GiB is free. Lower resolution, "
            + ("" if checkpointing else "turn gradient_checkpointing on, ")
            + "lower rank, or use training_dtype bf16")
    weights = max(min_weights_bytes, min(model_bytes, room))
    return TrainingMemory(weights, model_bytes - weights, lora, acts)


class SavedBytes:
    """Counts the bytes autograd saves for backward inside the block, each storage once, leaving out the
    parameters and buffers of `exclude` (the model's weights exist anyway): the activations."""

    def __init__(self, exclude=None):
        self.total, self._seen = 0, set()
        if exclude is not None:
            self._seen = {(t.untyped_storage().data_ptr(), t.device)
                          for t in [*exclude.parameters(), *exclude.buffers()]}

    def _pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in self._seen:
            self._seen.add(key)
            self.total += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def fit_linear_quadratic(n1, b1, n2, b2):
    """(a, c) of bytes = a*n + c*n^2 through two (tokens, bytes) measurements."""
    c = (b2 / n2 - b1 / n1) / (n2 - n1)
    return b1 / n1 - c * n1, c

