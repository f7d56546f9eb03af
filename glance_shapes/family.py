"""The teacher's model family, passed to the engine as an object (the engine's family table does not list it):
pixel space (no VAE), 4x4 patches, no shift; the SD3 recipe's layers (the teacher is an SD3 MMDiT)."""
from glance_core.families import DEFAULT_RECIPE, Family, sd3

FAMILY = Family("glance-shapes", "Glance shapes teacher", vae_factor=1, patch_size=4, shift_mode="static",
                shift=1.0, aliases=("shapes",), in_comfyui=False, recipe=dict(DEFAULT_RECIPE),
                target_pattern=sd3.FAMILY.target_pattern)
