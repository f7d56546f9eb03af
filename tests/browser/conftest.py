"""A real ComfyUI server (with this pack and the test stand-ins) and headless Debian Chromium driven by Playwright."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

import comfy_runtime
import lora_files as lf

ARTIFACTS = os.path.join(comfy_runtime.PACK_ROOT, "test-artifacts", "browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _need(ok, what):
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} [CI=true: the browser tests must run]")
        pytest.skip(what)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_dir(root):
    custom = os.path.join(root, "custom_nodes")
    os.makedirs(custom)
    os.symlink(comfy_runtime.PACK_ROOT, os.path.join(custom, "glance"))
    os.symlink(os.path.join(comfy_runtime.PACK_ROOT, "tests", "stand_in_nodes"),
               os.path.join(custom, "glance_test_stand_ins"))
    loras = os.path.join(root, "models", "loras")
    os.makedirs(os.path.join(loras, "glance"))
    for phase, seed in (("slow", 1), ("fast", 2)):
        lf.write(os.path.join(loras, f"glance_qwen_{phase}.safetensors"),
                 lf.official_qwen_tensors(blocks=2, rank=4, seed=seed))
        lf.write(os.path.join(loras, "glance", f"my_flux_pair_{phase}.safetensors"),
                 lf.flux_diffusers_tensors(hidden=64, seed=seed))
    os.makedirs(os.path.join(root, "input"))
    from PIL import Image
    img = Image.new("RGB", (320, 256), (200, 60, 40))
    img.paste((30, 90, 220), (80, 64, 240, 192))
    img.save(os.path.join(root, "input", "glance_reference.png"))
    # The training template's image: the one ComfyUI ships in its input folder.
    shutil.copyfile(os.path.join(comfy_runtime.find_comfyui()[0], "input", "example.png"),
                    os.path.join(root, "input", "example.png"))


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory):
    """ComfyUI's main.py on 127.0.0.1 at a free port; stopped at the end, even on failure."""
    path, where = comfy_runtime.find_comfyui()
    _need(path is not None, f"ComfyUI runtime not available ({where}): {comfy_runtime.HOW_TO}")
    root = str(tmp_path_factory.mktemp("ui_base"))
    _base_dir(root)
    port = _free_port()
    log = open(os.path.join(root, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", root, "--preview-method", "latent2rgb"],
                            cwd=path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(url + "/object_info/GlanceSampler", timeout=5) as r:
                    if "GlanceSampler" in json.load(r):
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"ComfyUI did not answer within 180 s; see {log.name}")
            time.sleep(1)
        yield {"url": url, "root": root, "log": log.name}
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")  # Playwright's sync API keeps an event loop running until it is closed:
def browser():                   # close it with the module so later tests can use asyncio.run()
    exe = shutil.which("chromium")
    _need(exe is not None, "Debian's chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed (pip install -r requirements-dev.txt)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, ui_server):
    """A fresh page on the ComfyUI web UI, with the API events it receives recorded in window.__glance."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.goto(ui_server["url"] + "/", wait_until="domcontentloaded")
    pg.wait_for_function("window.app && window.app.graph && window.app.api", timeout=90000)
    pg.evaluate("""() => {
        const r = window.__glance = {progress: [], previews: 0, executed: [], done: [], errors: [], interrupted: 0};
        const api = window.app.api;
        api.addEventListener('progress', e => r.progress.push([e.detail.value, e.detail.max, e.detail.node]));
        for (const t of ['b_preview', 'b_preview_with_metadata']) api.addEventListener(t, () => r.previews++);
        api.addEventListener('executed', e => r.executed.push(e.detail));
        api.addEventListener('execution_success', e => r.done.push(e.detail));
        api.addEventListener('execution_error', e => r.errors.push(e.detail));
        api.addEventListener('execution_interrupted', () => r.interrupted++);
    }""")
    os.makedirs(ARTIFACTS, exist_ok=True)
    try:
        yield pg
    finally:
        ctx.close()
