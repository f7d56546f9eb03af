"""Glance core: schedules, LoRA files and integrators for Glance slow/fast adapter pairs.

Plain Python on torch and safetensors (diffusers and peft for the optional diffusers side);
this package never imports ComfyUI.
"""
__version__ = "0.1.0"
