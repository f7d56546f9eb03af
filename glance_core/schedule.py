"""Glance schedules as data: which sigmas each phase is conditioned at and where each Euler step moves.

A schedule is built by compressing a family's base N-step grid: the slow phase takes every
`slow_stride`-th index of the first `slow_steps * slow_stride` indices, the fast phase takes evenly
spaced indices over the rest, the last one pinned to the grid's final index N-1; sigma 0 ends it.
All sigma values are in [0, 1]; timesteps (t = 1000 * sigma) appear only in the JSON for reading.
"""
import json
import math
import operator
import struct
from dataclasses import asdict, dataclass

from .errors import ScheduleError
from .families import get_family
from .sigmas import SaturatedShift

MODES = ("consistent", "reference")
PHASES = ("slow", "fast")
MAX_BASE_STEPS = 1000


@dataclass(frozen=True)
class StepSettings:
    """How a Glance schedule compresses its base grid (counts of steps, not sigmas); checked when built."""
    base_steps: int = 50
    slow_steps: int = 5
    slow_stride: int = 2
    fast_steps: int = 5

    def __post_init__(self):
        glance_indices(self.base_steps, self.slow_steps, self.slow_stride, self.fast_steps)

    def as_dict(self):
        """{base_steps, slow_steps, slow_stride, fast_steps} (the node inputs, flags and metadata keys)."""
        return asdict(self)


DEFAULTS = {f: getattr(StepSettings, f) for f in ("base_steps", "slow_steps", "slow_stride", "fast_steps")}


def phase_at(sigma, boundary):
    """Which phase ("slow" or "fast") a model call at `sigma` belongs to: slow above the boundary sigma."""
    return "slow" if sigma > boundary else "fast"


@dataclass(frozen=True)
class Step:
    """One model call: condition at `sigma`, move the latent from `sigma_from` to `sigma_to`."""
    phase: str
    sigma: float
    sigma_from: float
    sigma_to: float


@dataclass(frozen=True)
class Schedule:
    """An ordered list of steps plus what produced it."""
    family: str
    mode: str
    width: int
    height: int
    base_steps: int
    slow_steps: int
    slow_stride: int
    fast_steps: int
    slow_indices: tuple
    fast_indices: tuple
    steps: tuple
    base_sigmas: tuple = None  # family 'explicit' only: the base grid compressed (recorded so a pair can be rebuilt)

    def phase_sigmas(self, phase):
        """Conditioning sigmas of one phase, in sampling order."""
        return [s.sigma for s in self.steps if s.phase == phase]

    @property
    def sigmas(self):
        """Conditioning sigmas of all steps followed by 0.0 (a ComfyUI SIGMAS list in consistent mode)."""
        return [s.sigma for s in self.steps] + [0.0]

    @property
    def boundary(self):
        """Sigma between the two phases: a model call above it is slow, at or below it fast."""
        return 0.5 * (self.phase_sigmas("slow")[-1] + self.phase_sigmas("fast")[0])

    def phase_at(self, sigma):
        """Which phase ("slow" or "fast") a model call at this sigma belongs to."""
        return phase_at(sigma, self.boundary)

    @property
    def settings(self):
        """The StepSettings this schedule was built with."""
        return StepSettings(self.base_steps, self.slow_steps, self.slow_stride, self.fast_steps)

    def to_dict(self):
        """Plain-data form (JSON-safe): the inputs, per-phase lists and every step."""
        d = {k: v for k, v in asdict(self).items()
             if k not in ("steps", "slow_indices", "fast_indices", "base_sigmas")}
        if self.base_sigmas is not None:
            d["base_sigmas"] = list(self.base_sigmas)
        for phase, idx in (("slow", self.slow_indices), ("fast", self.fast_indices)):
            sig = self.phase_sigmas(phase)
            d[phase] = {"indices": list(idx), "sigmas": sig, "timesteps": [1000.0 * s for s in sig]}
        d["boundary"] = self.boundary
        d["sigmas"] = self.sigmas
        d["steps"] = [asdict(s) for s in self.steps]
        return d

    def to_json(self, **kw):
        """The schedule as a JSON string."""
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d):
        """Rebuild a schedule from `to_dict` output (as stored in LoRA metadata)."""
        try:
            steps = tuple(Step(s["phase"], float(s["sigma"]), float(s["sigma_from"]), float(s["sigma_to"]))
                          for s in d["steps"])
            base = d.get("base_sigmas")
            return cls(d["family"], d["mode"], d["width"], d["height"], d["base_steps"], d["slow_steps"],
                       d["slow_stride"], d["fast_steps"], tuple(d["slow"]["indices"]),
                       tuple(d["fast"]["indices"]), steps, None if base is None else tuple(float(s) for s in base))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise ScheduleError(f"stored schedule is incomplete or malformed ({e!r})") from None


def _int(name, value, lo, hi=None):
    try:
        v = operator.index(value)
    except TypeError:
        raise ScheduleError(f"{name} must be a whole number, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        rng = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ScheduleError(f"{name} must be in {rng}, got {v}")
    return v


def glance_indices(base_steps, slow_steps, slow_stride, fast_steps):
    """Indices into an N-step base grid for the slow and the fast phase (two tuples)."""
    n = _int("base_steps", base_steps, 2, MAX_BASE_STEPS)
    slow_steps = _int("slow_steps", slow_steps, 1, n)
    slow_stride = _int("slow_stride", slow_stride, 1, n)
    fast_steps = _int("fast_steps", fast_steps, 1, n)
    start = slow_steps * slow_stride
    if start > n - 1:
        raise ScheduleError(
            f"the slow phase ({slow_steps} steps x stride {slow_stride} = {start} indices) uses up the whole "
            f"{n}-step base schedule: the fast phase would not reach the end; lower slow_steps or slow_stride "
            f"or raise base_steps")
    remaining = n - start
    if fast_steps > remaining:
        raise ScheduleError(
            f"fast_steps {fast_steps} needs {fast_steps} distinct indices but only {remaining} remain after the "
            f"slow phase (indices {start}..{n - 1} of {n}); lower fast_steps")
    slow = tuple(i * slow_stride for i in range(slow_steps))
    if fast_steps == 1:
        return slow, (n - 1,)
    # Evenly spaced over [start, N], last pinned to N-1: for N=50 this gives 10, 20, 30, 40, 49.
    span = remaining / (fast_steps - 1)
    fast = [start + math.floor(i * span + 1e-9) for i in range(fast_steps - 1)] + [n - 1]
    return slow, tuple(fast)


def build_schedule(family="qwen-image", width=1024, height=1024, mode="consistent", base_sigmas=None,
                   **steps):
    """Build a Glance schedule for a family at a pixel size; `base_sigmas` only for family 'explicit'.

    `steps` may set base_steps, slow_steps, slow_stride, fast_steps (defaults 50, 5, 2, 5).
    """
    unknown = set(steps) - set(DEFAULTS)
    if unknown:
        raise ScheduleError(f"unknown schedule settings: {', '.join(sorted(unknown))}")
    step_settings = {**DEFAULTS, **steps}
    fam = get_family(family)
    if mode not in MODES:
        raise ScheduleError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if fam.shift_mode == "explicit":
        grid = _explicit_grid(base_sigmas)
        step_settings["base_steps"] = len(grid)
        if mode == "reference":
            raise ScheduleError("mode 'reference' re-creates the official pipeline's fresh fast-stage grid, "
                                "which needs a family formula; family 'explicit' supports 'consistent' only")
    else:
        if base_sigmas is not None:
            raise ScheduleError(f"base_sigmas is only for family 'explicit', not {fam.name!r}")
        _int("base_steps", step_settings["base_steps"], 2, MAX_BASE_STEPS)
        try:
            grid = fam.base_sigmas(step_settings["base_steps"], width, height)
        except SaturatedShift:
            raise ScheduleError(_collapsed(fam, width, height, step_settings)) from None
    slow_idx, fast_idx = glance_indices(**step_settings)
    cond = [("slow", grid[i]) for i in slow_idx] + [("fast", grid[i]) for i in fast_idx]
    if not _distinct([s for _, s in cond]):
        if fam.shift_mode == "explicit":
            raise ScheduleError("explicit base_sigmas: the steps' sigmas are not distinct in float32 (the "
                                "precision ComfyUI samples at); spread them further apart")
        raise ScheduleError(_collapsed(fam, width, height, step_settings))

    if mode == "consistent":
        nxt = [s for _, s in cond[1:]] + [0.0]
        out = [Step(p, s, s, t) for (p, s), t in zip(cond, nxt)]
    else:
        # The official pipeline overrides only the timesteps: the slow stage steps along consecutive
        # entries of the N-step grid, the fast stage along a fresh fast_steps grid that restarts at 1.0.
        fast_grid = fam.base_sigmas(step_settings["fast_steps"], width, height) + [0.0]
        full = grid + [0.0]
        out = [Step("slow", s, full[i], full[i + 1]) for i, (_, s) in enumerate(cond[:len(slow_idx)])]
        out += [Step("fast", s, fast_grid[j], fast_grid[j + 1])
                for j, (_, s) in enumerate(cond[len(slow_idx):])]
    st = step_settings
    return Schedule(fam.name, mode, width, height, st["base_steps"], st["slow_steps"], st["slow_stride"],
                    st["fast_steps"], slow_idx, fast_idx, tuple(out),
                    tuple(grid) if fam.shift_mode == "explicit" else None)


def _distinct(sigmas):
    # ComfyUI carries sigmas as float32: steps that round to one value would be no steps at all.
    f32 = [struct.unpack("f", struct.pack("f", s))[0] for s in sigmas]
    return all(math.isfinite(s) and 0.0 < s <= 1.0 for s in sigmas) and all(b < a for a, b in zip(f32, f32[1:]))


def _collapsed(fam, width, height, step_settings):
    """Why a preset's grid has no usable steps at this size, with the largest square size that has them."""
    m = fam.pixel_multiple
    lo, hi = 1, max(width, height) // m  # in units of the pixel multiple; lo is assumed to work
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            ok = _distinct(_cond_sigmas(fam, mid * m, mid * m, step_settings))
        except ScheduleError:
            ok = False
        lo, hi = (mid, hi) if ok else (lo, mid)
    return (f"{fam.label} at {width}x{height} px: the family's resolution shift pushes the Glance steps' sigmas "
            f"so close to 1 that they are no longer distinct (every step would be the same pure-noise step). "
            f"Its schedule works up to about {lo * m}x{lo * m} px (or the same number of pixels) with these "
            f"step settings; generate smaller and upscale")


def _cond_sigmas(fam, width, height, step_settings):
    grid = fam.base_sigmas(step_settings["base_steps"], width, height)
    slow_idx, fast_idx = glance_indices(**step_settings)
    return [grid[i] for i in slow_idx + fast_idx]


def model_size(family, latent_height, latent_width):
    """(width, height) in pixels that the model really sees for a latent of this many cells.

    Patch-based models pad the latent up to whole patches (ComfyUI's pad_to_patch_size), so a latent
    from a size that is a multiple of the VAE factor but not of the patch size is seen one patch larger.
    """
    fam = get_family(family)
    cells = [-(-int(v) // fam.patch_size) * fam.patch_size for v in (latent_width, latent_height)]
    if min(cells) <= 0:
        raise ScheduleError(f"latent of {latent_width}x{latent_height} cells is empty")
    return cells[0] * fam.vae_factor, cells[1] * fam.vae_factor


def check_stored(d):
    """Rebuild a schedule recorded in LoRA metadata and check it is one this pack could have made."""
    sched = Schedule.from_dict(d)
    fam = get_family(sched.family)
    for name in ("width", "height"):
        v = getattr(sched, name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1 << 20:
            raise ScheduleError(f"{name} {v!r} is not a plausible pixel size")
    for name in DEFAULTS:
        _int(name, getattr(sched, name), 1, MAX_BASE_STEPS)
    if sched.mode not in MODES:
        raise ScheduleError(f"unknown mode {sched.mode!r}")
    slow, fast = glance_indices(sched.base_steps, sched.slow_steps, sched.slow_stride, sched.fast_steps)
    if (slow, fast) != (sched.slow_indices, sched.fast_indices):
        raise ScheduleError("its step indices do not follow from its step settings")
    if len(sched.steps) != len(slow) + len(fast) or \
            [s.phase for s in sched.steps] != ["slow"] * len(slow) + ["fast"] * len(fast):
        raise ScheduleError("its steps do not match its step settings")
    if not _distinct([s.sigma for s in sched.steps]) or \
            not all(math.isfinite(v) and 0.0 <= v <= 1.0 for s in sched.steps for v in (s.sigma_from, s.sigma_to)):
        raise ScheduleError("its sigmas are not finite, decreasing values in (0, 1]")
    if fam.shift_mode == "explicit":
        if sched.base_sigmas is not None:
            grid = _explicit_grid(sched.base_sigmas)
            if len(grid) != sched.base_steps:
                raise ScheduleError(f"base_steps {sched.base_steps} but {len(grid)} base_sigmas")
    elif sched.base_sigmas is not None:
        raise ScheduleError(f"base_sigmas recorded for preset family {fam.name!r}")
    return sched


def _explicit_grid(base_sigmas):
    if base_sigmas is None or len(base_sigmas) == 0:
        raise ScheduleError("family 'explicit' needs base_sigmas: the base schedule's sigmas, highest first")
    try:
        grid = [float(s) for s in base_sigmas]
    except (TypeError, ValueError) as e:
        raise ScheduleError(f"explicit base_sigmas must be numbers ({e})") from None
    if grid[-1] == 0.0:
        grid = grid[:-1]  # accept a ComfyUI SIGMAS list with its closing 0
    if any(not (0.0 < s <= 1.0) for s in grid):
        raise ScheduleError("explicit base_sigmas must lie in (0, 1] (a trailing 0 is allowed)")
    if any(b >= a for a, b in zip(grid, grid[1:])):
        raise ScheduleError("explicit base_sigmas must be strictly decreasing")
    if len(grid) < 2:
        raise ScheduleError("explicit base_sigmas needs at least 2 nonzero sigmas")
    if len(grid) > MAX_BASE_STEPS:
        raise ScheduleError(f"explicit base_sigmas: {len(grid)} sigmas, at most {MAX_BASE_STEPS}")
    return grid
