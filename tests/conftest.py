import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # glance_core for the core tests
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # comfy_runtime helper

import comfy_runtime  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI runtime, started once. Skipped without ComfyUI, except under CI=true (then a failure)."""
    path, where = comfy_runtime.find_comfyui()
    if path is None:
        msg = f"ComfyUI runtime not available ({where}): {comfy_runtime.HOW_TO}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " [CI=true: the ComfyUI tests must run]")
        pytest.skip(msg)
    comfy_runtime.start(str(tmp_path_factory.mktemp("comfy_base")))
    return path


@pytest.fixture(scope="session")
def pack(comfy):
    """This repository imported as ComfyUI imports a custom node pack."""
    return comfy_runtime.load_pack()
