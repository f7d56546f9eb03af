"""What a model family is: its sigma formula and everything else that differs per family.

A family module (qwen_image.py, flux.py, sd3.py) subclasses `Family` and fills in its preset, training
recipe, target layers, LoRA layout markers, how a diffusers pipeline encodes, packs, calls and decodes,
and how a ComfyUI model is recognised. The numbers are those of the families' diffusers scheduler configs
and pipelines, so the grids match what the official Glance scripts (diffusers) sample at.
"""
import re
from dataclasses import dataclass, field

from .. import sigmas as sm
from ..errors import GlanceError, ScheduleError

# The recipe of families without an official one (rank, alpha = 4 x rank, AdamW settings).
DEFAULT_RECIPE = dict(rank=16, alpha=64.0, lr=5e-4, weight_decay=0.01, caption_dropout=0.0)

# Which layers a pair adapts: the family's recipe (the paper's), or only the timestep embedder's two linears,
# a function of sigma alone: it cannot learn the training caption, so what it learns carries to other prompts.
RECIPE_LAYERS = "recipe (paper)"
TIMESTEP_LAYERS = "timestep embedder"
LAYERS = (RECIPE_LAYERS, TIMESTEP_LAYERS)
# Qwen-Image, FLUX.1 and SD3 spell it alike in diffusers; ComfyUI's LoRA key maps know these names.
TIMESTEP_PATTERN = re.compile(r"time_text_embed\.timestep_embedder\.linear_[12]$")


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
    recipe: dict = field(default_factory=lambda: dict(DEFAULT_RECIPE))  # official training settings
    # The layers the recipe adapts, as diffusers spells module names (ComfyUI's key map knows the same names).
    target_pattern: re.Pattern = None
    timestep_pattern: re.Pattern = TIMESTEP_PATTERN  # the timestep embedder's linears (diffusers names)
    # Layer names no other family has (kohya form: dots as underscores), for guessing a LoRA file's family.
    markers: tuple = ()
    comfy_config: str = None     # class name in comfy.supported_models (subclasses match too)
    pipeline: str = None         # diffusers pipeline class name
    # ComfyUI training: the guidance value set on the conds (the official FLUX recipe trains at 1.0).
    train_guidance: float = None
    # Blocks never add in place into tensors autograd saved (so no copies needed without checkpointing).
    in_place_safe: bool = False
    # ComfyUI spells this family's module names as diffusers does (its LoRAs load into a pipeline as they are).
    comfyui_names_are_diffusers: bool = False
    # Which generate() argument is this family's guidance scale, and what it means (for help texts).
    guidance_arg: str = "guidance_scale"

    def layer_pattern(self, layers=RECIPE_LAYERS, name="layers"):
        """The module-name pattern (diffusers names) of `layers`, one of LAYERS; errors name the input."""
        if layers not in LAYERS:
            raise GlanceError(f"{name}: {layers!r} is not one of {', '.join(map(repr, LAYERS))}")
        pattern = self.target_pattern if layers == RECIPE_LAYERS else self.timestep_pattern
        if pattern is None:
            raise GlanceError(f"{name}: the {self.label} family names no {layers} layers")
        return pattern

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

    # --- diffusers pipeline hooks (families with a `pipeline`) -------------------------------------
    # Latents are "unpacked" as the VAE gives them (normalised), "packed" as the transformer takes them.

    def setup(self, pipe, *, prompt, negative_prompt, height, width, guidance, generator, n, embeds, device):
        """(velocity call(x, sigma), initial packed latents) for generate(); sigma in [0, 1] per batch entry."""
        raise GlanceError(f"{self.label}: no diffusers pipeline support")

    def encode_image(self, pipe, image):
        """Normalised, unpacked VAE latent of a [1, 3, H, W] image in [0, 1]."""
        vae = pipe.vae
        lat = vae.encode((image * 2 - 1).to(vae.device, vae.dtype)).latent_dist.mode()
        return (lat - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    def pack(self, pipe, lat):
        """The transformer's layout of an unpacked latent."""
        return lat

    def decode(self, pipe, latents, height, width):
        """Images in [-1, 1] from packed latents."""
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return vae.decode(latents, return_dict=False)[0]

    def train_conditioning(self, pipe, text, embeds, device):
        """Encoded prompt for training, as `train_call` takes it; `embeds` are precomputed ones (or None)."""
        raise GlanceError(f"{self.label}: no diffusers training support")

    def train_call(self, pipe, height, width, device, dtype):
        """call(xt, sigma, cond) -> velocity for one packed latent at pixel size height x width."""
        raise GlanceError(f"{self.label}: no diffusers training support")


def check_size(family, width, height):
    """Raise ScheduleError unless width and height are positive multiples of the family's pixel multiple."""
    m = family.pixel_multiple
    for label, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v <= 0 or v % m:
            raise ScheduleError(f"{label} {v} must be a positive multiple of {m} px for {family.label} "
                                f"({family.vae_factor}x VAE, {family.patch_size}x{family.patch_size} patches)")

