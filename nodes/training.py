"""Training on a ComfyUI MODEL: targets per family, autograd-safe weights, checkpointed blocks, the step loop
run through ComfyUI's own model call path (a custom Sampler under a CFGGuider)."""
import contextlib
import math
import re

import comfy.samplers
import comfy.utils
import torch
import torch.utils.checkpoint

from ..glance_core import memory, runtime
from ..glance_core.errors import GlanceError
from ..glance_core.families import RECIPE_LAYERS, get_family
from ..glance_core.train import lora_pair_params
from .pair import key_map_of, split_target

# Other flow families: attention projections under their ComfyUI names.
GENERIC = re.compile(r"(attn|attention)[^.]*\.(qkv|to_q|to_k|to_v|q_proj|k_proj|v_proj|to_out\.0|o_proj|out_proj|"
                     r"proj)$")


def training_targets(model, family, layers=RECIPE_LAYERS):
    """[(save name, namespace, weight key, offset, length)] of the layers a pair adapts (`layers`: the family's
    recipe or its timestep embedder; a model without a family has only the generic attention layers)."""
    out = []
    if family is None and layers != RECIPE_LAYERS:
        raise GlanceError(f"layers: {layers!r} needs a model of a known family (Qwen-Image, FLUX.1, SD3); this one "
                          f"has none, so only {RECIPE_LAYERS!r} (its attention layers) can be trained")
    pattern = None if family is None else get_family(family).layer_pattern(layers)
    if pattern is not None:
        for k, target in key_map_of(model).items():
            if k.startswith("transformer.") and pattern.search(k[len("transformer."):]):
                key, _, off, length = split_target(target)
                out.append((k[len("transformer."):], "diffusers", key, off, length))
    else:
        for k, w in model.model.state_dict().items():
            name = k[len("diffusion_model."):-len(".weight")]
            if k.startswith("diffusion_model.") and k.endswith(".weight") and w.dim() == 2 and GENERIC.search(name):
                out.append((name, "comfyui", k, 0, None))
    return sorted(out)


def build_adapter(model, targets, rank, alpha, phase, dtype, generator):
    """A trainable run-time Adapter over `targets`, plus {save name: (down, up)} of its parameters."""
    adapter = runtime.Adapter(phase, trainable=True)
    params = {}
    for name, _, key, off, length in targets:
        module = comfy.utils.get_attr(model.model, key[: -len(".weight")])
        out_f, in_f = module.weight.shape
        n = out_f if length is None else length
        down, up = lora_pair_params((rank, in_f), (n, rank), rank, dtype=dtype, device=module.weight.device,
                                    generator=generator)
        adapter.add(module, down, up, alpha / rank, off, None if length is None else length)
        params[name] = (down, up)
    return adapter, params


def _blocks(diffusion_model):
    """The transformer blocks of a ComfyUI diffusion model (its ModuleLists named *blocks)."""
    return [b for name, child in diffusion_model.named_children()
            if isinstance(child, torch.nn.ModuleList) and name.endswith("blocks") for b in child]


def _shape(t):
    """A weight's logical shape (GGUF tensors store packed bytes and report it as tensor_shape)."""
    return getattr(t, "tensor_shape", t.shape)


def training_memory(patcher, targets, rank, tokens, compute_dtype, checkpointing, free_bytes):
    """The memory plan of one LoRA's training on `patcher` (a loaded ModelPatcher), as a TrainingMemory.

    free_bytes: device memory free beyond what the model holds (None on the CPU: estimate only, no refusal).
    Raises GlanceError naming the settings when it cannot fit.
    """
    dm = patcher.model.diffusion_model
    shapes = [(comfy.utils.get_attr(patcher.model, key).shape, length) for _, _, key, _, length in targets]
    lora_params = sum(rank * (shape[-1] + (shape[0] if length is None else length)) for shape, length in shapes)
    size, loaded = patcher.model_size(), patcher.loaded_size()
    blocks = _blocks(dm)
    # Activations scale with the model's width whichever layers are trained (the gradient of a timestep-embedder
    # LoRA still flows back through every block): the narrowest linear of a block reads that width.
    block_shapes = [_shape(m.weight) for m in (blocks[0].modules() if blocks else ())
                    if isinstance(getattr(m, "weight", None), torch.Tensor)]
    widths = [shape[-1] for shape in block_shapes if len(shape) == 2]
    width = min(widths) if widths else min(shape[-1] for shape, _ in shapes)
    compute_bytes = torch.tensor([], dtype=compute_dtype).element_size()
    # Weights stored in another dtype are cast per layer.
    cast = sum(math.prod(_shape(p)) for p in blocks[0].parameters()
               if p.dtype != compute_dtype) * compute_bytes if blocks else 0
    return memory.plan_memory(size, loaded, lora_params, tokens, width, len(blocks), compute_bytes, checkpointing,
                              cast, free_bytes=math.inf if free_bytes is None else free_bytes)


def materialise(module):
    """Replace inference-mode tensors (how ComfyUI builds and loads models) by normal ones, in place.

    Autograd cannot save inference tensors for backward; each tensor is swapped one at a time, so the
    model never exists twice.
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()


def _clone_tensors(x):
    if torch.is_tensor(x):
        return x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_clone_tensors(v) for v in x)
    return x


def _clone_saved(t):
    # Activations only: weights (leaves) are never modified in place, and copying them would copy the model.
    return t.clone() if t.grad_fn is not None else t


def _keep(t):
    return t


@contextlib.contextmanager
def trainable_blocks(diffusion_model, checkpointing, clone_saved):
    """Make every transformer block safe (and optionally cheap) to backpropagate through, while training.

    checkpointing: recompute each block in backward, with the same run-time adapters active again, each run
    on copies of the inputs: FLUX and SD3 blocks add in place into their inputs (`txt += ...`), which would
    otherwise change what the recomputation starts from.
    clone_saved (without checkpointing): save copies of activations for backward, so those in-place adds do
    not invalidate them.
    """
    patched = []
    for name, child in diffusion_model.named_children():
        if not (isinstance(child, torch.nn.ModuleList) and name.endswith("blocks")):
            continue
        for block in child:
            orig = block.forward
            patched.append((block, block.__dict__.get("forward")))
            if checkpointing:
                def fwd(*args, _orig=orig, **kwargs):
                    adapters = runtime.current()

                    def again(*a, **k):  # the original forward and its recomputation both start from copies
                        a, k = _clone_tensors(a), {n: _clone_tensors(v) for n, v in k.items()}
                        with runtime.active(*adapters, replace=True):
                            return _orig(*a, **k)
                    return torch.utils.checkpoint.checkpoint(again, *args, use_reentrant=False, **kwargs)
            elif clone_saved:
                def fwd(*args, _orig=orig, **kwargs):
                    with torch.autograd.graph.saved_tensors_hooks(_clone_saved, _keep):
                        return _orig(*args, **kwargs)
            else:
                patched.pop()
                continue
            block.forward = fwd
    try:
        yield len(patched)
    finally:
        for block, own in patched:
            if own is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = own


class TrainLoop(comfy.samplers.Sampler):
    """A 'sampler' that trains: CFGGuider.sample prepares conds and loads the model, then calls this."""

    def __init__(self, run):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run(model_wrap, latent_image, extra_args)
        return latent_image
