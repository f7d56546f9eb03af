"""Flow models without a preset: the base schedule's sigmas are given (or read from the model)."""
from .base import Family

FAMILY = Family("explicit", "Explicit sigmas", shift_mode="explicit", timestep_pattern=None)
