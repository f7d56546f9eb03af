import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # glance_core for the core tests
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # comfy_runtime helper

import comfy_runtime  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """The real ComfyUI runtime, started once on GLANCE_TEST_DEVICE (default cpu). Skipped without ComfyUI, except
    under CI=true (then a failure); a GLANCE_TEST_DEVICE this machine lacks is always a failure."""
    try:
        comfy_runtime.runtime_device()  # checked first: a GPU asked for and not there fails, even without ComfyUI
        path, where = comfy_runtime.find_comfyui()
        if path is None:
            msg = f"ComfyUI runtime not available ({where}): {comfy_runtime.HOW_TO}"
            if os.environ.get("CI") == "true":
                pytest.fail(msg + " [CI=true: the ComfyUI tests must run]")
            pytest.skip(msg)
        comfy_runtime.start(str(tmp_path_factory.mktemp("comfy_base")))
    except comfy_runtime.DeviceError as e:  # never fall back to the CPU
        pytest.fail(str(e), pytrace=False)
    return path


@pytest.fixture(scope="session")
def comfyui_gguf(comfy):
    """city96's ComfyUI-GGUF imported as a node pack. Skipped without it (or `gguf`), except under CI=true."""
    path, where = comfy_runtime.find_comfyui_gguf()
    missing = None
    if path is None:
        missing = where
    else:
        try:
            import gguf  # noqa: F401  (ComfyUI-GGUF's own dependency)
        except ImportError as e:
            missing = f"the gguf package is not installed ({e})"
    if missing:
        msg = f"ComfyUI-GGUF not available: {missing}: {comfy_runtime.GGUF_HOW_TO}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " [CI=true: the GGUF tests must run]", pytrace=False)
        pytest.skip(msg)
    return comfy_runtime.load_comfyui_gguf(path)


@pytest.fixture(scope="session")
def pack(comfy):
    """This repository imported as ComfyUI imports a custom node pack."""
    return comfy_runtime.load_pack()
