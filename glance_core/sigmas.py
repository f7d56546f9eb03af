"""Flow-matching sigma math, as diffusers' FlowMatchEulerDiscreteScheduler does it.

All values here are sigmas in [0, 1] (sigma = 1 is pure noise); timesteps are t = 1000 * sigma.
"""
import math

from .errors import ScheduleError

# Below this, 1 - sigma has lost most of its float64 digits: the terminal stretch would amplify noise.
MIN_STRETCH_ROOM = 1e-9


class SaturatedShift(ScheduleError):
    """The resolution shift pushed a grid so close to sigma 1 that it cannot be used (too large an image)."""


def linear_mu(seq_len, base_seq_len, max_seq_len, base_shift, max_shift):
    """Resolution-dependent shift mu for an image of `seq_len` tokens (line through the two anchors)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + m * (seq_len - base_seq_len)


def exponential_shift(sigma, mu):
    """Exponential time shift of one sigma: e^mu / (e^mu + 1/sigma - 1); fixes 0 and 1."""
    if sigma <= 0.0:
        return 0.0
    r = 1.0 / sigma - 1.0
    if mu >= 0.0:  # the same value as e^mu / (e^mu + r), without overflowing for a huge image's mu
        return 1.0 / (1.0 + math.exp(-mu) * r)
    return math.exp(mu) / (math.exp(mu) + r)


def static_shift(sigma, shift):
    """SD3-style static shift of one sigma: shift*s / (1 + (shift-1)*s)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def stretch_to_terminal(sigmas, terminal):
    """Qwen-Image terminal stretch: rescale 1 - sigma so the last sigma becomes `terminal`."""
    room = 1.0 - sigmas[-1]
    if not room >= MIN_STRETCH_ROOM:
        raise SaturatedShift(f"the last sigma {sigmas[-1]!r} is too close to 1 to stretch to {terminal}")
    scale = room / (1.0 - terminal)
    return [1.0 - (1.0 - s) / scale for s in sigmas]


def linspace(start, stop, n):
    """n evenly spaced floats from start to stop inclusive (numpy.linspace for n >= 1)."""
    if n == 1:
        return [float(start)]
    step = (stop - start) / (n - 1)
    return [start + i * step for i in range(n - 1)] + [float(stop)]
