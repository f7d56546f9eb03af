"""Glance for ComfyUI: 10-step sampling of flow-matching models with a Slow/Fast LoRA pair.

ComfyUI imports this file by path; everything below uses relative imports (see nodes/).
"""
import importlib.util
import logging
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
GlanceExtension = None

if importlib.util.find_spec("comfy_api") is None:
    # Imported outside ComfyUI (a test runner collecting this folder, say): there is nothing to register.
    logging.getLogger("glance").debug("ComfyUI not importable; Glance nodes not registered")
else:
    try:
        from .nodes import GlanceExtension
    except ImportError as e:  # a missing dependency must not take ComfyUI or other packs down
        logging.error("[Glance] nodes not loaded: Python package %r is missing (%s). Install the pack's "
                      "requirements: pip install -r %s", e.name, e, os.path.join(_HERE, "requirements.txt"))


async def comfy_entrypoint():
    from comfy_api.v0_0_2 import ComfyExtension

    if GlanceExtension is not None:
        return GlanceExtension()

    class _Unavailable(ComfyExtension):  # registers nothing; the error above says why
        async def get_node_list(self):
            return []

    return _Unavailable()
