"""Read a LoRA file of any common layout into one in-memory form: per module (down, up, scale)."""
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch

from safetensors import SafetensorError, safe_open

from ..errors import GlanceError, LoraFileError, LoraMismatchError
from . import layouts
from .metadata import GlanceMeta
from .patterns import PatternError, PatternSet
from .safefile import json_object, read_header

log = logging.getLogger("glance")
SCALE_POLICIES = ("as trained", "as stored")
OFFICIAL_ATTN = re.compile(r"\.attn\.(to_q|to_k|to_v|to_out\.0)$")
OFFICIAL_ALPHA_PER_RANK = 4.0  # the official Glance recipes train at alpha = 4 x rank
MAX_SIDE_CONFIG = 10 * 1024 * 1024  # bytes of an adapter_config.json beside the file


@dataclass
class LoraModule:
    """One adapted layer: delta W = scale * up @ down."""
    down: object        # torch.Tensor (rank, in[, k, k])
    up: object          # torch.Tensor (out, rank[, 1, 1])
    alpha: float = None  # alpha stored as a tensor in the file, None if absent
    scale: float = 1.0  # the multiplier in use, chosen by the scale policy

    @property
    def rank(self):
        return self.down.shape[0]

    def delta(self):
        """The weight delta scale * up @ down, in float32, shaped like the layer's weight."""
        up, down = self.up.float(), self.down.float()
        if down.dim() > 2:  # conv LoRA: (r, in, k, k) and (out, r, 1, 1)
            return self.scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return self.scale * (up @ down)


@dataclass
class LoraFile:
    """A LoRA file normalised: module names without prefix, in the file's naming namespace."""
    path: str
    layout: str                 # glance-official, glance, diffusers, peft, kohya, comfyui
    namespace: str              # diffusers, comfyui or kohya (how module names are spelled)
    modules: dict               # module name -> LoraModule
    metadata: dict              # raw safetensors metadata
    glance: GlanceMeta = None   # parsed Glance record, if the file has one
    scale_policy: str = "as trained"
    scale_note: str = ""        # one line saying which scale was applied and why
    ignored: list = field(default_factory=list)  # keys read but not applied (text encoder), with reason

    @property
    def ranks(self):
        return sorted({m.rank for m in self.modules.values()})

    @property
    def family(self):
        """Family from Glance metadata, else guessed from layer names; None if undecided."""
        if self.glance is not None:
            return self.glance.family
        return layouts.guess_family(self.modules)

    def summary(self):
        """One log line: file, layout, modules, ranks, scale."""
        ranks = "/".join(str(r) for r in self.ranks)
        fam = self.family or "unknown family"
        return (f"{os.path.basename(self.path)}: {self.layout} layout, {fam}, {len(self.modules)} modules, "
                f"rank {ranks}; {self.scale_note}")


def read_lora(path, scale_policy="as trained", device="cpu"):
    """Read and normalise a LoRA safetensors file; raises LoraFileError naming the file on bad input."""
    path = os.fspath(path)
    if scale_policy not in SCALE_POLICIES:
        raise LoraFileError(path, f"unknown scale policy {scale_policy!r}; choose one of {SCALE_POLICIES}")
    header, metadata = read_header(path)
    glance = GlanceMeta.from_header(metadata, path)

    parts, ignored, unknown, namespaces, styles = {}, [], [], set(), set()
    for key in header:
        if layouts.is_text_encoder_key(key):
            ignored.append(f"{key} (text encoder)")
            continue
        split = layouts.split_key(key)
        if split is None:
            unknown.append(key)
            continue
        ns, module, role, style = split
        namespaces.add(ns)
        if style:
            styles.add(style)
        parts.setdefault(module, {})[role] = key
    if unknown:
        raise LoraFileError(path, f"{len(unknown)} tensors are not LoRA down/up/alpha weights (e.g. "
                                  f"{', '.join(sorted(unknown)[:3])}); DoRA, LoHa, LoKr and full-weight diffs "
                                  "are not supported")
    if not parts:
        what = "only text-encoder LoRA tensors" if ignored else "no LoRA tensors"
        raise LoraFileError(path, f"{what} found: a Glance LoRA adapts the diffusion model")
    if len(namespaces) > 1:
        raise LoraFileError(path, f"mixes key prefixes of several layouts ({', '.join(sorted(namespaces))})")
    namespace = namespaces.pop()

    modules = {}
    try:
        with safe_open(path, framework="pt", device=device) as f:
            for module, roles in sorted(parts.items()):
                if "down" not in roles or "up" not in roles:
                    have = ", ".join(sorted(roles))
                    raise LoraFileError(path, f"module {module!r} has {have} but needs both down and up weights")
                down, up = f.get_tensor(roles["down"]), f.get_tensor(roles["up"])
                _check_shapes(path, module, down, up)
                alpha = _alpha(path, module, f.get_tensor(roles["alpha"])) if "alpha" in roles else None
                for role, t in (("down", down), ("up", up)):
                    _check_finite(path, roles[role], t)
                modules[module] = LoraModule(down, up, alpha)
    except (SafetensorError, OSError, RuntimeError) as e:  # what safetensors/torch raise on a bad file
        raise LoraFileError(path, f"cannot read the tensors ({type(e).__name__}: {str(e)[:300]})") from None

    layout = _layout(namespace, styles, modules, glance, header)
    lora = LoraFile(path, layout, namespace, modules, metadata, glance, scale_policy, ignored=ignored)
    _apply_scales(lora, _trained_scales(lora, path))
    log.info("Glance LoRA %s", lora.summary())
    return lora


def _alpha(path, module, t):
    if t.numel() != 1:
        raise LoraFileError(path, f"module {module!r}: alpha has shape {tuple(t.shape)}, needs one number")
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                     torch.uint8)):
        raise LoraFileError(path, f"module {module!r}: alpha is a {t.dtype} tensor, needs a number")
    a = float(t.float().item())
    if not math.isfinite(a):
        raise LoraFileError(path, f"module {module!r}: alpha is {a} (not a finite number); the file is broken")
    return a


def _check_finite(path, key, t):
    # A NaN or inf weight makes every image all-NaN: refuse the file instead of sampling garbage.
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise LoraFileError(path, f"tensor {key!r} holds {bad} NaN or infinite values; the file is broken "
                                  "(a diverged training run?)")


def _check_shapes(path, module, down, up):
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise LoraFileError(path, f"module {module!r}: down {tuple(down.shape)} and up {tuple(up.shape)} "
                                  "are not a LoRA pair (need 2-D, or 4-D conv, tensors)")
    if up.shape[1] != down.shape[0]:
        raise LoraFileError(path, f"module {module!r}: up {tuple(up.shape)} and down {tuple(down.shape)} "
                                  f"disagree on the rank ({up.shape[1]} vs {down.shape[0]})")


def _layout(namespace, styles, modules, glance, header):
    if glance is not None:
        return "glance"
    if namespace == "kohya":
        return "kohya"
    if namespace == "comfyui":
        return "comfyui"
    has_alpha = any(m.alpha is not None for m in modules.values())
    if styles == {"dot", "peft"} and not has_alpha and any(k.startswith("transformer.") for k in header):
        dotted = [k for k in header if k.endswith((".lora.down.weight", ".lora.up.weight"))]
        if all(OFFICIAL_ATTN.search(layouts.split_key(k)[1]) for k in dotted):
            return "glance-official"
    if any(k.startswith("base_model.model.") for k in header):
        return "peft"
    return "diffusers"


def _trained_scales(lora, path):
    """(module -> scale the LoRA was trained at, source) from metadata or a known layout; (None, None) if unknown."""
    if lora.glance is not None:
        return {n: float(lora.glance.alpha) / m.rank for n, m in lora.modules.items()}, "Glance metadata"
    peft_config = _peft_config(lora.metadata, path)
    if peft_config is not None:
        return _scales_from_peft_config(peft_config, lora.modules, path), "the file's peft adapter config"
    if lora.layout == "glance-official":
        return ({n: OFFICIAL_ALPHA_PER_RANK for n in lora.modules},
                "official Glance layout, trained at alpha = 4 x rank")
    return None, None


def _apply_scales(lora, trained):
    scales, source = trained
    stored = sum(m.alpha is not None for m in lora.modules.values())
    for name, m in lora.modules.items():
        if m.alpha is not None:
            m.scale = m.alpha / m.rank
        elif lora.scale_policy == "as trained" and scales is not None:
            m.scale = scales[name]
        else:
            m.scale = 1.0
    shown = "/".join(f"{s:g}" for s in sorted({round(m.scale, 6) for m in lora.modules.values()}))
    if stored == len(lora.modules):
        lora.scale_note = f"scale {shown} from the alpha stored in the file"
    elif lora.scale_policy == "as trained" and scales is not None:
        lora.scale_note = f"as trained: scale {shown} ({source})"
    elif lora.scale_policy == "as trained":
        lora.scale_note = f"scale {shown}: the file records no alpha, so the trained scale is unknown"
    else:
        lora.scale_note = f"as stored: scale {shown} (alpha = rank where the file stores none, as stock loaders do)"
        if scales is not None:
            lora.scale_note += f"; the trained scale ({source}) would differ"


def _peft_config(metadata, path):
    """The peft LoraConfig dict a diffusers/peft file carries (header or adapter_config.json beside it)."""
    raw = metadata.get("lora_adapter_metadata")
    if raw is not None:
        peft_config = json_object(raw, path, "lora_adapter_metadata")
        # Pipeline-level saves prefix every key with the component name ("transformer.lora_alpha").
        if "lora_alpha" not in peft_config:
            peft_config = {k.split(".", 1)[1]: v for k, v in peft_config.items() if k.startswith("transformer.")}
        return _checked_peft_config(peft_config, path, "lora_adapter_metadata") if "lora_alpha" in peft_config else None
    side = os.path.join(os.path.dirname(path), "adapter_config.json")
    if os.path.basename(path) == "adapter_model.safetensors" and os.path.isfile(side):
        try:
            with open(side, "rb") as fh:
                text = fh.read(MAX_SIDE_CONFIG + 1).decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LoraFileError(side, f"cannot read adapter_config.json ({e})") from None
        if len(text) > MAX_SIDE_CONFIG:
            raise LoraFileError(side, f"adapter_config.json is over {MAX_SIDE_CONFIG} bytes; not a peft config")
        peft_config = json_object(text, side, "adapter_config.json")
        return _checked_peft_config(peft_config, side, "adapter_config.json") if "lora_alpha" in peft_config else None
    return None


def _checked_peft_config(peft_config, path, what):
    """The fields of a peft config this reader uses, type-checked; LoraFileError naming `what` otherwise."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not number(peft_config["lora_alpha"]):
        raise LoraFileError(path, f"{what}: lora_alpha is {peft_config['lora_alpha']!r}, needs a finite number")
    pattern = peft_config.get("alpha_pattern")
    pattern = {} if pattern is None else pattern
    if not isinstance(pattern, dict) or not all(number(a) for a in pattern.values()):
        raise LoraFileError(path, f"{what}: alpha_pattern must map module patterns to finite numbers")
    if not isinstance(peft_config.get("use_rslora", False), bool):
        raise LoraFileError(path, f"{what}: use_rslora is {peft_config['use_rslora']!r}, needs true or false")
    try:
        patterns = PatternSet(pattern)
    except PatternError as e:
        raise LoraFileError(path, f"{what}: alpha_pattern: {e}") from None
    return {"lora_alpha": peft_config["lora_alpha"], "alpha_pattern": pattern, "patterns": patterns,
            "use_rslora": peft_config.get("use_rslora", False), "where": what}


def _scales_from_peft_config(peft_config, modules, path):
    # peft: the first alpha_pattern key matching `(.*\.)?(key)$` applies; else lora_alpha.
    # The keys are evaluated by patterns.PatternSet, in bounded time whatever the file holds.
    # rsLoRA scales by alpha / sqrt(r) instead of alpha / r.
    out = {}
    for name, m in modules.items():
        try:
            key = peft_config["patterns"].lookup(name)
        except PatternError as e:
            raise LoraFileError(path, f"{peft_config['where']}: alpha_pattern: {e}") from None
        alpha = peft_config["lora_alpha"] if key is None else peft_config["alpha_pattern"][key]
        out[name] = float(alpha) / (math.sqrt(m.rank) if peft_config["use_rslora"] else m.rank)
    return out


def match_modules(lora, layer_names, key_map=None):
    """Pair the file's modules with a model's layers: (matched {module: layer}, unmatched [module]).

    `layer_names` are the model's module paths; `key_map` optionally maps other spellings of a module
    (for example ComfyUI's map of diffusers names onto fused layers) to a layer name.
    """
    layers = set(layer_names)
    by_kohya = {layouts.kohya_name(n): n for n in layers}
    key_map = key_map or {}
    matched, unmatched = {}, []
    for name in lora.modules:
        hit = key_map.get(name) or (name if name in layers else None)
        if hit is None and lora.namespace == "kohya":
            hit = by_kohya.get(name)
        if hit is None:
            unmatched.append(name)
        else:
            matched[name] = hit
    return matched, unmatched


def check_matches(lora, layer_names, model_label="this model", key_map=None, strict=False):
    """match_modules, raising LoraMismatchError if nothing matches (or anything is left over, if strict)."""
    matched, unmatched = match_modules(lora, layer_names, key_map)
    if not matched or (strict and unmatched):
        total = len(lora.modules)
        fam = lora.family
        hint = f" The file looks like a {fam} LoRA." if fam else ""
        raise LoraMismatchError(
            lora.path, f"matched {len(matched)} of {total} LoRA modules to layers of {model_label}; "
                       f"unmatched e.g. {', '.join(unmatched[:4])}.{hint} Is it for another model family?")
    return matched, unmatched


def check_pair_phases(slow, fast, names=("slow", "fast")):
    """Refuse a Slow/Fast pair given swapped or from two families (Glance metadata); `names` label the inputs.

    Raises GlanceError starting with the input's name (a node input or a command-line flag).
    """
    for lora, want, name in ((slow, "slow", names[0]), (fast, "fast", names[1])):
        if lora.glance is not None and lora.glance.phase != want:
            raise GlanceError(f"{name}: {os.path.basename(lora.path)} is a {lora.glance.phase} LoRA (its Glance "
                              f"metadata says so); give the {want} one here")
    if slow.family and fast.family and slow.family != fast.family:
        raise GlanceError(f"{names[1]}: {os.path.basename(fast.path)} is a {fast.family} LoRA but {names[0]} "
                          f"{os.path.basename(slow.path)} is a {slow.family} LoRA: the two must be one pair")
    if slow.glance is not None and fast.glance is not None and slow.glance.family == "explicit" and \
            slow.glance.schedule and fast.glance.schedule and \
            slow.glance.schedule.get("base_sigmas") != fast.glance.schedule.get("base_sigmas"):
        raise GlanceError(f"{names[1]}: {os.path.basename(fast.path)} was trained on other base sigmas than "
                          f"{names[0]} {os.path.basename(slow.path)}: the two must be one pair")
