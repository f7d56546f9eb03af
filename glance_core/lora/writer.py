"""Write LoRA files that stock ComfyUI loaders read 1:1: explicit alpha, atomic, never clobbering by default."""
import os
import tempfile

import torch
from safetensors.torch import save_file

from ..errors import LoraFileError

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


def save_lora(path, modules, metadata=None, namespace="comfyui", dtype=None, overwrite=False):
    """Atomically write a LoRA safetensors file; `metadata` is a str->str header (e.g. GlanceMeta.to_header()).

    The file is written under a temporary name in the same folder and renamed into place, so an
    interrupted save never leaves a partial file under the final name.
    """
    path = os.fspath(path)
    if not modules:
        raise LoraFileError(path, "nothing to save: no LoRA modules")
    if os.path.exists(path) and not overwrite:
        raise LoraFileError(path, "file exists; choose another name or allow overwriting")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tensors = lora_state_dict(modules, namespace, dtype)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".part", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the name appeared meanwhile: never clobbers
            except FileExistsError:
                raise LoraFileError(path, "file exists; choose another name or allow overwriting") from None
            except OSError:  # filesystems without hard links
                if os.path.exists(path):
                    raise LoraFileError(path, "file exists; choose another name or allow overwriting") from None
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
