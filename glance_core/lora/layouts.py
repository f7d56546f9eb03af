"""Key layouts of LoRA files: split a tensor key into (namespace, module name, role).

Namespaces: "diffusers" (diffusers/peft module names, e.g. transformer_blocks.0.attn.to_q),
"comfyui" (ComfyUI's native names, e.g. double_blocks.0.img_attn.qkv) and "kohya" (the module path
with dots turned into underscores, after `lora_unet_`).
"""
import re

# (suffix, role, naming style) — longest first, so ".lora.down.weight" wins over ".weight" forms.
SUFFIXES = (
    (".lora_down.weight", "down", "kohya"),
    (".lora_up.weight", "up", "kohya"),
    (".lora.down.weight", "down", "dot"),
    (".lora.up.weight", "up", "dot"),
    (".lora_A.weight", "down", "peft"),
    (".lora_B.weight", "up", "peft"),
    (".alpha", "alpha", None),
)
# peft state dicts may carry the adapter name: ".lora_A.default.weight".
PEFT_NAMED = re.compile(r"^(.*)\.lora_([AB])\.[A-Za-z0-9_\-]+\.weight$")

PREFIXES = (
    ("base_model.model.transformer.", "diffusers"),
    ("base_model.model.", "diffusers"),
    ("model.diffusion_model.", "comfyui"),
    ("diffusion_model.", "comfyui"),
    ("transformer.", "diffusers"),
    ("lora_unet_", "kohya"),
)
# Text-encoder LoRAs are legitimate in some files but never part of a Glance pair: reported, not applied.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.")


def family_markers():
    """(family name, marker layer names) of every registered family: names no other family has (kohya form,
    so every namespace compares alike). FLUX's native img_mod.lin / img_mlp.0 differ from Qwen's."""
    from ..families import REGISTRY
    return tuple((f.name, f.markers) for f in REGISTRY if f.markers)


def split_key(key):
    """(namespace, module, role, style) for a LoRA tensor key, or None if it is not a LoRA tensor key."""
    role = style = None
    for suffix, r, s in SUFFIXES:
        if key.endswith(suffix):
            base, role, style = key[: -len(suffix)], r, s
            break
    else:
        m = PEFT_NAMED.match(key)
        if not m:
            return None
        base, role, style = m.group(1), "down" if m.group(2) == "A" else "up", "peft"
    namespace = "diffusers"  # bare diffusers names (no prefix) are what peft's model-level save writes
    for prefix, ns in PREFIXES:
        if base.startswith(prefix):
            base, namespace = base[len(prefix):], ns
            break
    return namespace, base, role, style


def is_text_encoder_key(key):
    """True for keys of text-encoder LoRAs (kohya lora_te*, diffusers text_encoder.*)."""
    return key.startswith(TEXT_ENCODER_PREFIXES)


def kohya_name(module):
    """A module path in kohya form (dots to underscores), for matching kohya files."""
    return module.replace(".", "_")


def guess_family(module_names):
    """Family name whose marker layers appear in these module names, or None if none or several do (how a
    file's family is guessed)."""
    names = [kohya_name(n) for n in module_names]
    found = {fam for fam, marks in family_markers() for name in names if any(m in name for m in marks)}
    return found.pop() if len(found) == 1 else None
