"""What a ComfyUI MODEL is, in glance_core's terms: its family preset and whether it is flow-matching."""
import comfy.model_sampling
import comfy.supported_models as sm

from ..glance_core.errors import GlanceError
from ..glance_core.families import REGISTRY

# From the family modules' `comfy_config`, checked in registry order: subclasses (FluxSchnell, FluxInpaint)
# come under their base class.
FAMILY_OF_CONFIG = tuple((getattr(sm, f.comfy_config), f.name) for f in REGISTRY
                         if f.comfy_config and hasattr(sm, f.comfy_config))


def require_flow(model, input_name="model"):
    """Raise GlanceError unless the MODEL predicts flow-matching velocity (CONST sampling)."""
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, comfy.model_sampling.CONST):
        kind = type(model.model.model_config).__name__
        raise GlanceError(f"{input_name}: Glance needs a flow-matching model (Qwen-Image, FLUX, SD3...); "
                          f"this {kind} model uses {type(ms).__name__} sampling (eps or v prediction)")


def family_of(model):
    """glance_core family name for a ComfyUI MODEL, or None when no preset fits it."""
    cfg = model.model.model_config
    for cls, name in FAMILY_OF_CONFIG:
        if isinstance(cfg, cls):
            return name
    return None


def model_label(model):
    """Short human name of a MODEL's architecture, for messages."""
    return type(model.model.model_config).__name__
