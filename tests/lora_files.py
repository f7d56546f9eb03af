"""Write LoRA files in the layouts users bring, for the tests (real formats, made-up numbers)."""
import torch
from safetensors.torch import save_file

# The 12 module types of the official Qwen-Image Glance release, per block.
QWEN_ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
QWEN_OTHER = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
              "img_mlp.net.2", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]


def qwen_shapes(dim, mlp, mod):
    """(in, out) of each official target in one Qwen-Image block of width dim."""
    shapes = {m: (dim, dim) for m in QWEN_ATTN + QWEN_OTHER[:4]}
    shapes.update({"img_mlp.net.2": (mlp, dim), "txt_mlp.net.2": (mlp, dim),
                   "img_mod.1": (dim, mod), "txt_mod.1": (dim, mod)})
    return shapes


def official_qwen_tensors(blocks=2, rank=4, dim=32, mlp=128, mod=192, seed=0, dtype=torch.bfloat16):
    """State dict in the official Glance release layout: prefix transformer., mixed naming, no alpha."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for b in range(blocks):
        for m, (fin, fout) in qwen_shapes(dim, mlp, mod).items():
            key = f"transformer.transformer_blocks.{b}.{m}"
            down = (torch.randn(rank, fin, generator=g) * 0.1).to(dtype)
            up = (torch.randn(fout, rank, generator=g) * 0.1).to(dtype)
            if m in QWEN_ATTN:
                sd[key + ".lora.down.weight"], sd[key + ".lora.up.weight"] = down, up
            else:
                sd[key + ".lora_A.weight"], sd[key + ".lora_B.weight"] = down, up
    return sd


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def kohya_tensors(names, rank=4, fin=16, fout=16, alpha=8.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        k = "lora_unet_" + n.replace(".", "_")
        sd[k + ".lora_down.weight"] = torch.randn(rank, fin, generator=g)
        sd[k + ".lora_up.weight"] = torch.randn(fout, rank, generator=g)
        sd[k + ".alpha"] = torch.tensor(alpha)
    return sd


def comfy_tensors(names, rank=4, fin=16, fout=16, alpha=2.0, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        k = "diffusion_model." + n
        sd[k + ".lora_down.weight"] = torch.randn(rank, fin, generator=g)
        sd[k + ".lora_up.weight"] = torch.randn(fout, rank, generator=g)
        sd[k + ".alpha"] = torch.tensor(alpha)
    return sd


def flux_diffusers_tensors(hidden=64, rank=4, seed=0, scale=0.3):
    """A FLUX LoRA in diffusers layout on q/k/v of one double and one single block (ComfyUI fuses these)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for blk in ("transformer_blocks.0", "single_transformer_blocks.0"):
        for p in ("to_q", "to_k", "to_v"):
            k = f"transformer.{blk}.attn.{p}"
            sd[k + ".lora_A.weight"] = torch.randn(rank, hidden, generator=g) * scale
            sd[k + ".lora_B.weight"] = torch.randn(hidden, rank, generator=g) * scale
    return sd
