"""LoRA files: read every common layout into one form, write ComfyUI-loadable files with Glance metadata."""
from .metadata import GlanceMeta
from .reader import (SCALE_POLICIES, LoraFile, LoraModule, check_matches, check_pair_phases, match_modules,
                     read_lora)
from .writer import lora_state_dict, save_lora

__all__ = ["GlanceMeta", "SCALE_POLICIES", "LoraFile", "LoraModule", "check_matches", "check_pair_phases",
           "match_modules", "read_lora", "lora_state_dict", "save_lora"]
