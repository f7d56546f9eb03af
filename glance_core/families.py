"""Model family presets: how each family's base N-step sigma grid is computed at a resolution.

The numbers are those of the families' diffusers scheduler configs and pipelines, so the grids match
what the official Glance scripts (diffusers) sample at.
"""
from dataclasses import dataclass, field

from . import sigmas as sm
from .errors import ScheduleError


@dataclass(frozen=True)
class Family:
    """A flow-matching model family and the way its pipeline builds sigmas."""
    name: str
    label: str
    vae_factor: int = 8          # pixels per latent cell
    patch_size: int = 2          # latent cells per token side
    shift_mode: str = "dynamic"  # "dynamic" (mu from resolution), "static" (SD3) or "explicit"
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    shift: float = 1.0           # static shift
    shift_terminal: float = None  # Qwen-Image stretches the last sigma to this
    # "pipeline": the pipeline passes linspace(1, 1/N, N) (Qwen-Image, FLUX);
    # "scheduler": the scheduler's default linspace(1, sigma_min, N) of its shifted training grid (SD3).
    grid: str = "pipeline"
    aliases: tuple = field(default=())
    in_comfyui: bool = True      # offered by the ComfyUI nodes (the bundled pixel-space teacher is not)

    @property
    def pixel_multiple(self):
        """Width and height must be multiples of this many pixels (VAE factor x patch size)."""
        return self.vae_factor * self.patch_size

    def seq_len(self, width, height):
        """Number of image tokens for a width x height pixel image."""
        m = self.pixel_multiple
        return (height // m) * (width // m)

    def mu(self, width, height):
        """Resolution-dependent shift mu (dynamic families only)."""
        return sm.linear_mu(self.seq_len(width, height), self.base_seq_len, self.max_seq_len,
                            self.base_shift, self.max_shift)

    def base_sigmas(self, steps, width, height):
        """The family's N-step sigma grid at this pixel size: N sigmas from 1.0 down, final 0 excluded."""
        if self.shift_mode == "explicit":
            raise ScheduleError("family 'explicit' has no formula: give the sigmas themselves")
        check_size(self, width, height)
        if steps < 1:
            raise ScheduleError(f"base steps must be at least 1, got {steps}")
        if self.grid == "scheduler":
            # Shifted training grid's smallest sigma (t = 1 of 1000), mapped back through linspace.
            sigma_min = sm.static_shift(1.0 / 1000, self.shift)
            raw = sm.linspace(1.0, sigma_min, steps)
        else:
            raw = sm.linspace(1.0, 1.0 / steps, steps)
        if self.shift_mode == "dynamic":
            mu = self.mu(width, height)
            out = [sm.exponential_shift(s, mu) for s in raw]
        else:
            out = [sm.static_shift(s, self.shift) for s in raw]
        if self.shift_terminal is not None:
            out = sm.stretch_to_terminal(out, self.shift_terminal)
        return out


FAMILIES = {f.name: f for f in [
    Family("qwen-image", "Qwen-Image", base_seq_len=256, max_seq_len=8192, base_shift=0.5, max_shift=0.9,
           shift_terminal=0.02, aliases=("qwen", "qwen_image", "qwenimage")),
    Family("flux.1-dev", "FLUX.1-dev", base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15,
           aliases=("flux", "flux1", "flux-dev", "flux.1")),
    Family("sd3", "SD3 / SD3.5", shift_mode="static", shift=3.0, grid="scheduler",
           aliases=("sd3.5", "sd35", "sd3.5-large", "sd3.5-medium")),
    # The bundled teacher (glance_core.shapes): pixel space, 4x4 patches, no shift.
    Family("glance-shapes", "Glance shapes teacher", vae_factor=1, patch_size=4, shift_mode="static", shift=1.0,
           aliases=("shapes",), in_comfyui=False),
    Family("explicit", "Explicit sigmas", shift_mode="explicit"),
]}


def comfyui_families():
    """Names of the families the ComfyUI nodes offer."""
    return [n for n, f in FAMILIES.items() if f.in_comfyui]


def get_family(name):
    """Look a family up by name or alias (case-insensitive); raises ScheduleError naming the choices."""
    key = str(name).strip().lower()
    for fam in FAMILIES.values():
        if key == fam.name or key in fam.aliases:
            return fam
    raise ScheduleError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}")


def check_size(family, width, height):
    """Raise ScheduleError unless width and height are positive multiples of the family's pixel multiple."""
    m = family.pixel_multiple
    for label, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % m:
            raise ScheduleError(f"{label} {v} must be a positive multiple of {m} px for {family.label} "
                                f"({family.vae_factor}x VAE, {family.patch_size}x{family.patch_size} patches)")
