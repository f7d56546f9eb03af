"""Write LoRA files that stock ComfyUI loaders read 1:1: explicit alpha, atomic, never clobbering by default."""
import dataclasses
import json

import torch
from safetensors.torch import save_file

from ..errors import LoraFileError
from ..files import atomic_write

PREFIX = {"comfyui": "diffusion_model.", "diffusers": "transformer."}


def lora_state_dict(modules, namespace="comfyui", dtype=None):
    """Tensors for `modules` {name: (down, up, alpha)} as `<prefix><name>.lora_down/.lora_up/.alpha` keys."""
    if namespace not in PREFIX:
        raise ValueError(f"namespace must be one of {tuple(PREFIX)}, got {namespace!r}")
    out = {}
    for name, (down, up, alpha) in modules.items():
        key = PREFIX[namespace] + name
        down, up = down.detach().cpu(), up.detach().cpu()
        if dtype is not None:
            down, up = down.to(dtype), up.to(dtype)
        out[key + ".lora_down.weight"] = down.contiguous()
        out[key + ".lora_up.weight"] = up.contiguous()
        out[key + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def save_lora_diffusers(path, modules, meta, overwrite=False):
    """Write `modules` {diffusers name: (down, up, alpha)} in peft layout for diffusers' load_lora_weights.

    diffusers reads no alpha tensors, so each scale alpha/rank is folded into up and the file says
    lora_alpha = r: the weight deltas stay exactly those of the ComfyUI file.
    """
    return _write(path, *diffusers_export(path, modules, meta), overwrite)


def diffusers_export(path, modules, meta):
    """(tensors, header) of the diffusers export of `modules` (see save_lora_diffusers); `path` names errors."""
    ranks = {down.shape[0] for down, _, _ in modules.values()}
    if len(ranks) != 1:
        raise LoraFileError(path, f"diffusers export needs one rank for all modules, got {sorted(ranks)}")
    (rank,) = ranks
    tensors = {}
    for name, (down, up, alpha) in modules.items():
        key = "transformer." + name
        tensors[key + ".lora_A.weight"] = down.detach().float().cpu().contiguous()
        tensors[key + ".lora_B.weight"] = (up.detach().float().cpu() * (float(alpha) / rank)).contiguous()
    config = {"transformer.r": rank, "transformer.lora_alpha": rank, "transformer.target_modules": sorted(modules)}
    folded = dataclasses.replace(meta, alpha=float(rank), extra={**meta.extra, "scale_folded_into_up": True,
                                                                 "trained_alpha": meta.alpha})
    header = {**folded.to_header(), "lora_adapter_metadata": json.dumps(config), "format": "pt"}
    return tensors, header


def file_writer(tensors, metadata):
    """write(tmp) that saves `tensors` with a str->str header: for files.stage / the training plan."""
    return lambda tmp: save_file(tensors, tmp, metadata=dict(metadata or {}))


def save_lora(path, modules, metadata=None, namespace="comfyui", dtype=None, overwrite=False):
    """Atomically write a LoRA safetensors file; `metadata` is a str->str header (e.g. GlanceMeta.to_header()).

    The file is written under a temporary name in the same folder and renamed into place, so an
    interrupted save never leaves a partial file under the final name.
    """
    if not modules:
        raise LoraFileError(path, "nothing to save: no LoRA modules")
    return _write(path, lora_state_dict(modules, namespace, dtype), metadata, overwrite)


def _write(path, tensors, metadata, overwrite):
    try:
        return atomic_write(path, file_writer(tensors, metadata), overwrite)
    except FileExistsError:
        raise LoraFileError(path, "file exists; choose another name or allow overwriting") from None
