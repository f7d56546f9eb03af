"""The pack in ComfyUI's real web UI, as a person uses it: templates, nodes, a run, cancel, errors, training."""
import json
import os
import time
import urllib.parse
import urllib.request

import comfy_runtime

ARTIFACTS = os.path.join(comfy_runtime.PACK_ROOT, "test-artifacts", "browser")

QWEN = "Glance Qwen-Image 10 steps, official pair"
COMPARE = "Glance compare 50 steps, plain 10 and Glance 10"
TEMPLATES = ["Glance FLUX 10 steps, a pair you trained", QWEN, COMPARE, "Glance train a pair from one image"]
CATEGORY = "Glance (10-step sampling)"  # what locales/en/main.json makes of the pack's folder name ("glance")
# Files each template's note names and the missing-models dialog lists, less those the test ComfyUI has.
MISSING = {
    TEMPLATES[0]: ["diffusion_models / flux1-dev.safetensors", "text_encoders / clip_l.safetensors",
                   "text_encoders / t5xxl_fp16.safetensors", "vae / ae.safetensors"],
    QWEN: ["diffusion_models / qwen_image_fp8_e4m3fn.safetensors",
           "text_encoders / qwen_2.5_vl_7b_fp8_scaled.safetensors", "vae / qwen_image_vae.safetensors"],
}
MISSING["Glance train a pair from one image"] = MISSING[COMPARE] = MISSING[QWEN]
EXPECTED_VALUES = {
    "GlanceSampler": {"sampler_name": "euler", "mode": "consistent", "family": "auto", "base_steps": 50,
                      "fast_steps": 5},
    "GlanceTrainLoRAPair": {"output_name": "my_glance_pair", "steps": 60, "training_dtype": "bf16",
                            "resolution": 1024, "phases": "both", "gradient_checkpointing": True, "image_index": -1},
    "GlanceLoRAPairLoader": {"strength_slow": 1.0, "strength_fast": 1.0, "scale_policy": "as trained"},
}


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, name + ".png"))


def open_templates(page):
    """Workflow menu (the logo, top left) -> Browse Templates; a first start shows the same dialog by itself."""
    time.sleep(1)
    if page.get_by_text("Get Started with a Template").count() == 0:
        page.mouse.click(18, 19)
        page.get_by_text("Browse Templates").first.click()
    nav = page.get_by_role("dialog").get_by_text(CATEGORY, exact=True).first
    nav.wait_for(timeout=15000)
    time.sleep(0.5)  # the dialog animates in
    nav.scroll_into_view_if_needed()
    nav.click()
    page.get_by_role("dialog").get_by_text(TEMPLATES[0], exact=True).first.wait_for(timeout=15000)


def test_templates_are_listed_with_thumbnails(page):
    open_templates(page)
    dialog = page.get_by_role("dialog")
    for name in TEMPLATES:  # the title, then the description: the file name with '-' and '_' as spaces
        assert dialog.get_by_text(name, exact=True).count() >= 1, name
        described = name.replace("-", " ").replace("_", " ")
        assert dialog.get_by_text(described, exact=True).count() >= (1 if described != name else 2), described
    # The frontend fetches each <name>.jpg and shows it as a blob: our thumbnails are 768 x 432.
    page.wait_for_function("""() => [...document.querySelectorAll('[role=dialog] img')]
        .filter(i => i.complete && i.naturalWidth === 768 && i.naturalHeight === 432).length === %d""" % len(TEMPLATES),
                           timeout=15000)
    shot(page, "1_templates")


def _object_info(url, node):
    with urllib.request.urlopen(f"{url}/object_info/{node}") as r:
        return json.load(r)[node]


def test_each_template_opens_with_every_glance_node_and_its_widgets(page, ui_server):
    for name in TEMPLATES:
        open_templates(page)
        page.get_by_role("dialog").get_by_text(name, exact=True).first.click()
        page.get_by_text("Get Started with a Template").first.wait_for(state="detached", timeout=15000)
        page.wait_for_function(f"() => window.app.graph._nodes.some(n => n.type.startsWith('Glance'))", timeout=15000)
        time.sleep(1)
        # The frontend's missing-models dialog (from the loaders' properties.models) lists what this test
        # ComfyUI lacks, and not the Glance pair it has.
        dialog = page.get_by_role("dialog")
        for label in MISSING[name]:
            dialog.get_by_text(label).first.wait_for(timeout=15000)
        text = page.evaluate("() => document.body.innerText")
        assert "loras / glance_qwen_slow.safetensors" not in text, f"{name}: a file that is there is listed as missing"
        shot(page, f"2_{name}_missing_models")
        close_dialogs(page)
        text = page.evaluate("() => document.body.innerText")
        assert "missing" not in text.lower(), f"{name}: a missing-node message is shown"
        # The note is on the canvas and shown on the page, naming the files and their folders.
        note = page.evaluate("() => window.app.graph._nodes.filter(n => n.type === 'MarkdownNote').map(n => n.title)")
        assert note == ["Read me first"], note
        assert "What to expect" in text and "ComfyUI/models/diffusion_models/" in text, f"{name}: note not shown"
        if name == QWEN:
            assert "CSU-JPG/Glance" in text and "glance_qwen_fast.safetensors" in text
        nodes = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type.startsWith('Glance'))
            .map(n => [n.type, (n.widgets || []).map(w => w.name)])""")
        values = page.evaluate("""() => Object.fromEntries(window.app.graph._nodes.filter(n => n.type.startsWith('Glance'))
            .map(n => [n.type, Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))]))""")
        # The stored values land on the right widgets (a missing seed-control slot would shift them).
        for node_type, want in EXPECTED_VALUES.items():
            if node_type in values:
                got = {k: values[node_type].get(k) for k in want}
                assert got == want, (name, node_type, got)
        assert nodes, name
        for node_type, widgets in nodes:
            info = _object_info(ui_server["url"], node_type)
            inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
            expected = [k for k, v in inputs.items()
                        if (isinstance(v[0], list) or v[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))]
            assert [w for w in widgets if w in inputs] == expected, (name, node_type, widgets)
        shot(page, f"2_{name}")


def test_tooltips_show_on_hover(page):
    open_templates(page)
    page.get_by_role("dialog").get_by_text(QWEN, exact=True).first.click()
    page.wait_for_function("() => window.app.graph._nodes.some(n => n.type === 'GlanceSampler')", timeout=15000)
    close_dialogs(page)  # the missing-models dialog
    # Screen position of the sampler's 'mode' widget: (graph position + offset) * scale, inside the canvas.
    x, y = page.evaluate("""() => {
        const c = window.app.canvas, n = window.app.graph._nodes.find(n => n.type === 'GlanceSampler');
        const w = n.widgets.find(w => w.name === 'mode');
        const r = c.canvas.getBoundingClientRect(), s = c.ds.scale, o = c.ds.offset;
        return [r.left + (n.pos[0] + n.size[0] / 2 + o[0]) * s, r.top + (n.pos[1] + w.last_y + 10 + o[1]) * s];
    }""")
    page.mouse.move(x, y)
    page.mouse.move(x + 2, y + 1)
    page.wait_for_function("() => document.body.innerText.includes('reference: what the official Qwen pipeline')",
                           timeout=10000)
    shot(page, "3_tooltip")


def close_dialogs(page):
    """Dismiss the start-up template dialog (a fresh browser profile sees it) as a user would: Escape."""
    time.sleep(1)
    for _ in range(3):
        if page.locator(".p-dialog-mask").count() == 0:
            return
        page.keyboard.press("Escape")
        time.sleep(0.5)


def _queue_api(page, prompt):
    """Put an API-format graph on the canvas, then press the Run button."""
    close_dialogs(page)
    page.evaluate("p => window.app.loadApiJson(p, 'glance test')", prompt)
    page.wait_for_function("() => window.app.graph._nodes.length > 3", timeout=15000)
    close_dialogs(page)
    assert "Some Nodes Are Missing" not in page.evaluate("() => document.body.innerText")
    page.get_by_role("button", name="Run", exact=True).first.click()


def tiny_sample_prompt(slow="glance_qwen_slow.safetensors", fast="glance_qwen_fast.safetensors"):
    return {
        "1": {"class_type": "GlanceTestTinyModel", "inputs": {"family": "qwen-image"}},
        "2": {"class_type": "GlanceLoRAPairLoader", "inputs": {"model": ["1", 0], "slow_lora": slow, "fast_lora": fast,
                                                              "strength_slow": 1.0, "strength_fast": 1.0,
                                                              "scale_policy": "as trained"}},
        "3": {"class_type": "GlanceTestConditioning", "inputs": {"family": "qwen-image", "text": "a red fox"}},
        "4": {"class_type": "GlanceTestConditioning", "inputs": {"family": "qwen-image", "text": " "}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "6": {"class_type": "GlanceSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0], "seed": 1,
            "cfg": 2.0, "sampler_name": "euler", "mode": "consistent", "family": "auto", "base_steps": 50,
            "slow_steps": 5, "slow_stride": 2, "fast_steps": 5}},
        "7": {"class_type": "GlanceTestTinyVAE", "inputs": {"family": "qwen-image"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "glance_ui"}},
    }


def test_run_from_the_page_shows_progress_previews_and_the_image(page, ui_server):
    _queue_api(page, tiny_sample_prompt())
    page.wait_for_function("() => window.__glance.done.length || window.__glance.errors.length", timeout=180000)
    r = page.evaluate("() => window.__glance")
    assert not r["errors"], r["errors"]
    steps = [v for v, m, node in r["progress"] if m == 10]
    assert steps == list(range(1, 11)), r["progress"]  # the bar advanced over every sampling step
    assert r["previews"] >= 1  # latent previews during sampling
    saved = [e for e in r["executed"] if e["output"].get("images")]
    img = saved[-1]["output"]["images"][0]
    q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]})
    with urllib.request.urlopen(f"{ui_server['url']}/view?{q}") as resp:
        assert resp.read(4) == b"\x89PNG"
    page.wait_for_function("() => Object.keys(window.app.nodeOutputs || {}).length > 0", timeout=10000)
    shot(page, "4_run_finished")


def tiny_train_prompt(name, steps, with_curve=True):
    p = {
        "1": {"class_type": "GlanceTestTinyModel", "inputs": {"family": "qwen-image"}},
        "2": {"class_type": "GlanceTestTinyVAE", "inputs": {"family": "qwen-image"}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "glance_reference.png"}},
        "4": {"class_type": "GlanceTestConditioning", "inputs": {"family": "qwen-image", "text": "a blue square"}},
        "5": {"class_type": "GlanceTrainLoRAPair", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "image": ["3", 0], "positive": ["4", 0], "output_name": name,
            "steps": steps, "learning_rate": 0.01, "rank": 4, "alpha": 0.0, "caption_dropout": 0.0, "seed": 0,
            "training_dtype": "fp32", "resolution": 320, "phases": "both", "gradient_checkpointing": False,
            "overwrite": True, "export_diffusers": False, "image_index": -1}},
    }
    if with_curve:
        p["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}}
    return p


def test_training_from_the_page_shows_step_progress_and_the_loss_curve(page, ui_server):
    _queue_api(page, tiny_train_prompt("ui_pair", 6))
    page.wait_for_function("() => window.__glance.done.length || window.__glance.errors.length", timeout=300000)
    r = page.evaluate("() => window.__glance")
    assert not r["errors"], r["errors"]
    assert [v for v, m, node in r["progress"] if m == 12] == list(range(1, 13))  # 6 steps x 2 LoRAs
    curve = [e for e in r["executed"] if e["node"] == "6"][0]["output"]["images"][0]
    q = urllib.parse.urlencode({"filename": curve["filename"], "subfolder": curve["subfolder"], "type": curve["type"]})
    with urllib.request.urlopen(f"{ui_server['url']}/view?{q}") as resp:
        assert resp.read(4) == b"\x89PNG"
    for phase in ("slow", "fast"):
        assert os.path.isfile(os.path.join(ui_server["root"], "models", "loras", "glance", f"ui_pair_{phase}.safetensors"))
    shot(page, "6_training_done")


def test_interrupt_stops_a_long_run_within_a_step(page, ui_server):
    _queue_api(page, tiny_train_prompt("ui_interrupted", 3000))
    page.wait_for_function("() => window.__glance.progress.filter(p => p[1] === 6000).length >= 5 || "
                           "window.__glance.errors.length", timeout=180000)
    assert not page.evaluate("() => window.__glance.errors"), page.evaluate("() => window.__glance.errors")
    page.get_by_role("button", name="Cancel current run").first.click()
    clicked = page.evaluate("() => Math.max(...window.__glance.progress.filter(p => p[1] === 6000).map(p => p[0]))")
    page.wait_for_function("() => window.__glance.interrupted > 0", timeout=60000)
    r = page.evaluate("() => window.__glance")
    last = max(v for v, m, _ in r["progress"] if m == 6000)
    # Stopped within a step of the click (the slack covers steps already under way while the click travels).
    assert last <= clicked + 3 and last < 6000, (clicked, last)
    assert not r["done"]
    assert not [f for f in os.listdir(os.path.join(ui_server["root"], "models", "loras", "glance"))
                if f.startswith("ui_interrupted")]
    shot(page, "5_interrupted")


def test_bad_input_shows_comfyuis_error_dialog_with_our_message(page):
    _queue_api(page, tiny_sample_prompt(slow="glance/my_flux_pair_slow.safetensors",
                                        fast="glance/my_flux_pair_fast.safetensors"))
    page.wait_for_function("() => window.__glance.errors.length > 0", timeout=120000)
    time.sleep(2)
    shot(page, "7_error_dialog")
    page.get_by_text("slow_lora: my_flux_pair_slow.safetensors is a flux.1-dev LoRA but the model is qwen-image"
                     ).first.wait_for(timeout=15000)
    assert page.get_by_text("GlanceLoRAPairLoader", exact=True).count() >= 1  # the dialog names the node
