"""A Glance pair on a ComfyUI MODEL: both LoRAs as run-time branches, switched per model call by sigma.

The branches exist only inside this pair's model calls (glance_core.runtime swaps the adapted modules'
class for the call), so clones of the model without the pair, compiled or not, run the plain model.
No weight is patched, so ComfyUI's patches_uuid never changes: no reload between the phases or between
generations, and stock LoRAs, CFGNorm and ModelSampling patches stack as usual.
"""
import logging

import comfy.lora
import comfy.ops
import comfy.patcher_extension
import comfy.utils
import torch

from ..glance_core import runtime
from ..glance_core.errors import GlanceError, LoraFileError
from ..glance_core.families import get_family
from ..glance_core.lora import check_matches
from ..glance_core.schedule import StepSettings, build_schedule, model_size, phase_at

log = logging.getLogger("glance")
WRAPPER_KEY = "glance_pair"
BOUNDARY_OPTION = "glance_boundary"  # transformer_options key: the sampler's exact boundary sigma
# How each naming namespace of glance_core spells a module in ComfyUI's LoRA key map.
KEY_PREFIXES = {"comfyui": ("diffusion_model.",), "kohya": ("lora_unet_",),
                "diffusers": ("transformer.", "", "base_model.model.", "diffusion_model.")}

# ComfyUI's Linear ops compute F.linear(x, weight, bias) on the tensors `cast_bias_weight` returns (the stored
# ones when already in the compute dtype on the device, else a cast copy with lowvram patches applied): the
# branches can be folded into that product. Classes that change either method (fp8 scaled matmuls, GGUF
# dequantizing, mixed-precision ops) keep the separate branch.
_COMFY_LINEAR = comfy.ops.disable_weight_init.Linear


def _comfy_weights(module, x):
    """The (weight, bias) a ComfyUI Linear op's forward would multiply x with, or None (see runtime.plain_linear)."""
    if module.comfy_cast_weights or module.weight_function or module.bias_function:
        return comfy.ops.cast_bias_weight(module, x)[:2]
    return runtime.own_weights(module, x)


def _comfy_linear_is_plain():
    """Import-time check that this ComfyUI's Linear ops (plain and manual-cast) still compute exactly
    F.linear(x, *cast_bias_weight(...)) and that a cast returns a fresh copy: a ComfyUI that changes either gets
    separate branches, not a wrong fold."""
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(3, 4, generator=g)
        fresh = []
        for cls, dtype, patch in ((_COMFY_LINEAR, torch.float32, False), (_COMFY_LINEAR, torch.float32, True),
                                  (comfy.ops.manual_cast.Linear, torch.float16, False)):
            m = cls(4, 5, dtype=dtype)  # ComfyUI's ops skip initialisation: set the tensors
            if patch:  # a lowvram patch (here the identity): the cast must hand back a copy, not the weight
                m.weight_function = [lambda w: w]
            with torch.no_grad():
                m.weight.copy_(torch.randn(5, 4, generator=g))
                m.bias.copy_(torch.randn(5, generator=g))
                first = _comfy_weights(m, x)
                if not torch.equal(m(x), torch.nn.functional.linear(x, *first)):
                    return False
                if dtype != x.dtype or patch:  # a cast copy takes the pair's delta in place: fresh on every call
                    fresh.append(first[0].data_ptr() not in (m.weight.data_ptr(), _comfy_weights(m, x)[0].data_ptr()))
        return all(fresh)
    except Exception as e:  # any API change: keep the separate branch
        log.warning("Glance: ComfyUI's Linear ops could not be checked (%s); the pair's branches run separately", e)
        return False


if _comfy_linear_is_plain():
    runtime.plain_linear(lambda cls: cls.forward is _COMFY_LINEAR.forward
                         and cls.forward_comfy_cast_weights is _COMFY_LINEAR.forward_comfy_cast_weights,
                         _comfy_weights)
else:
    log.warning("Glance: this ComfyUI's Linear ops do not compute F.linear on their cast weights; the pair's "
                "branches run separately from the layers' products (exact, a few percent slower)")


def key_map_of(model):
    """ComfyUI's map of LoRA key spellings onto this MODEL's weights (what the stock LoraLoader uses)."""
    return comfy.lora.model_lora_keys_unet(model.model, {})


def split_target(target):
    """(weight key, slice dim, offset, length or None) of a key-map entry: a key, or a key with a fused slice."""
    if isinstance(target, str):
        return target, 0, 0, None
    return target[0], *target[1][:3]


def attach(model, lora, adapter, strength, input_name, key_map):
    """Map a LoraFile's modules onto the MODEL's layers through `key_map` (key_map_of) and add them to `adapter`."""
    targets = {}
    for name in lora.modules:
        for prefix in KEY_PREFIXES[lora.namespace]:
            hit = key_map.get(prefix + name)
            if hit is not None:
                targets[name] = hit
                break
    label = f"this {type(model.model.model_config).__name__} model"
    try:
        check_matches(lora, (), label, key_map=targets, strict=True)
        for name, m in lora.modules.items():
            _add_branch(model, lora.path, name, m, targets[name], adapter, strength)
    except LoraFileError as e:
        raise GlanceError(f"{input_name}: {e}") from None


def _add_branch(model, path, name, m, target, adapter, strength):
    key, dim, off, length = split_target(target)
    if dim != 0:
        raise LoraFileError(path, f"module {name!r} maps onto a slice of {key} along dim {dim}, "
                                  "which run-time branches do not support")
    module = comfy.utils.get_attr(model.model, key[: -len(".weight")])
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise LoraFileError(path, f"module {name!r} targets {key}, which is not a linear layer")
    out_f, in_f = weight.shape
    length = out_f if length is None else length
    if m.down.dim() != 2 or m.down.shape[1] != in_f or m.up.shape[0] != length:
        raise LoraFileError(path, f"module {name!r}: down {tuple(m.down.shape)} / up {tuple(m.up.shape)} do not "
                                  f"fit layer {key} (in {in_f}, out {length}); is the file for another model size?")
    adapter.add(module, m.down, m.up, m.scale * strength, off, None if length == out_f and off == 0 else length)


class GlancePair:
    """The APPLY_MODEL wrapper a Glance MODEL carries: picks the slow or fast adapter for each model call."""

    def __init__(self, slow, fast, family, steps, report, fixed_boundary=None, base_sigmas=None):
        self.adapters = {"slow": slow, "fast": fast}
        self.family = family    # schedule preset of the pair (metadata, else the model's family)
        self.steps = steps      # StepSettings the pair was trained for
        self.report = report
        self.trace = None       # set to a list to record (sigma, phase) of every call (tests, debugging)
        self.fixed_boundary = fixed_boundary  # for pairs on explicit schedules (no preset to compute one)
        self.base_sigmas = base_sigmas  # family 'explicit': the recorded base grid the schedule nodes compress
        self._boundaries = {}

    def boundary(self, x, transformer_options):
        """Sigma between the phases: the sampler's own if it set one, else the pair's schedule at x's size."""
        b = transformer_options.get(BOUNDARY_OPTION, self.fixed_boundary)
        if b is not None:
            return b
        # The size the model really sees (padded to whole patches), as the schedule nodes compute it.
        size = model_size(self.family, x.shape[-2], x.shape[-1])
        if size not in self._boundaries:
            self._boundaries[size] = build_schedule(self.family, *size, **self.steps.as_dict()).boundary
        return self._boundaries[size]

    def on_detach(self, patcher, unpatch_all):
        """ModelPatcher ON_DETACH callback: when ComfyUI unloads the model, free the adapters' device copies."""
        if unpatch_all:
            for adapter in self.adapters.values():
                adapter.release()

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                 **kwargs):
        sigma = float(t.reshape(-1)[0])
        phase = phase_at(sigma, self.boundary(x, transformer_options))
        if self.trace is not None:
            self.trace.append((sigma, phase))
        base_model = executor.class_obj  # comfy BaseModel: computes in its manual-cast dtype, else its own
        dtype = base_model.manual_cast_dtype or base_model.get_dtype() or x.dtype
        with runtime.active(self.adapters[phase], device=x.device, dtype=dtype):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def pair_of(model):
    """The GlancePair a MODEL carries (the last one loaded), or None."""
    pairs = model.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)
    return pairs[-1] if pairs else None


def with_pair(model, pair):
    """A clone of MODEL that carries `pair`."""
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, pair)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_DETACH, WRAPPER_KEY, pair.on_detach)
    return m


def pair_steps(slow, fast):
    """StepSettings of a pair: from its Glance metadata when present, else the defaults."""
    for lora in (slow, fast):
        sched = lora.glance.stored_schedule() if lora.glance else None
        if sched is not None:
            return sched.settings
    return StepSettings()
