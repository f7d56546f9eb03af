"""The bundled small teacher: procedural shape pictures, a pixel-space MMDiT trained on them, its judge,
and Glance on it (pair training, rendering, the demo). Plain torch + diffusers; no ComfyUI.

The defaults below live here, free of torch, so the command line can show them without loading anything.
"""
DEFAULT_CAPTION = "red circle top-left on white"  # the demo's and the benchmark's training sample
# The guidance the teacher is sampled with by default: at 3 its 50-step pictures fit their captions far more
# often than unguided (see the teacher record's check), as real text-to-image models are sampled with CFG.
DEFAULT_CFG = 3.0
# pair training: the paper's loss, the teacher's own path of the one sample, or glance_core.distill's objective
# (each Glance step lands on the teacher's 50-step path, over DISTILL_TRAJECTORIES paths of the one caption)
OBJECTIVES = ("flow-matching", "trajectory", "distill")
DISTILL_TRAJECTORIES = 64
# The distilled pair's settings, the best found by benchmarks/distill_study.py (docs/distill_study.md): only the
# timestep embedder is adapted (it cannot learn the caption, so it carries to held-out ones), more steps than
# the recipe's 60 (two small linears, a batch of one), and under guidance every second path is on the empty
# prompt (at cfg 1 the empty prompt's paths are unguided pictures of nothing asked for: caption only there).
DISTILL_STEPS = 1000
DISTILL_LR = 2e-3
DISTILL_LAYERS = "timestep embedder"  # glance_core.families.TIMESTEP_LAYERS (kept free of imports here)
