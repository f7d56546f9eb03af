"""The model families: one module each, registered in one table.

A new family is one module (a `Family` subclass instance named FAMILY) and one row in REGISTRY.
"""
from ..errors import ScheduleError
from . import explicit, flux, qwen_image, sd3
from .base import DEFAULT_RECIPE, LAYERS, RECIPE_LAYERS, TIMESTEP_LAYERS, Family, check_size

# The registry: order is the order the nodes and help texts list them.
REGISTRY = (
    qwen_image.FAMILY,
    flux.FAMILY,
    sd3.FAMILY,
    explicit.FAMILY,
)
FAMILIES = {f.name: f for f in REGISTRY}


def comfyui_families():
    """Names of the families the ComfyUI nodes offer."""
    return [n for n, f in FAMILIES.items() if f.in_comfyui]


def get_family(name):
    """A Family by name or alias (case-insensitive), or the Family object itself; ScheduleError names the choices."""
    if isinstance(name, Family):
        return name
    key = str(name).strip().lower()
    for fam in FAMILIES.values():
        if key == fam.name or key in fam.aliases:
            return fam
    raise ScheduleError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}")


def for_pipeline(pipe):
    """The Family of a diffusers pipeline object; GlanceError naming the supported pipelines."""
    from ..errors import GlanceError
    name = type(pipe).__name__
    for fam in REGISTRY:
        if fam.pipeline == name:
            return fam
    raise GlanceError(f"{name} is not supported; use one of {', '.join(f.pipeline for f in REGISTRY if f.pipeline)}")


__all__ = ["DEFAULT_RECIPE", "FAMILIES", "LAYERS", "RECIPE_LAYERS", "TIMESTEP_LAYERS", "Family", "REGISTRY",
           "check_size", "comfyui_families", "for_pipeline", "get_family"]
