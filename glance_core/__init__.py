"""Glance core: schedules, LoRA files and integrators for Glance slow/fast adapter pairs.

Plain Python on torch, safetensors and diffusers (peft for the optional pipelines side);
this package never imports ComfyUI.
"""
__version__ = "0.1.0"
