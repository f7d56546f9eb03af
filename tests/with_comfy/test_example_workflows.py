"""The example workflows against the live node schemas, then executed in real ComfyUI with tiny stand-ins."""
import glob
import json
import os

import pytest

import comfy_exec
import comfy_runtime
import lora_files as lf

WF_DIR = os.path.join(comfy_runtime.PACK_ROOT, "example_workflows")
WORKFLOWS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WF_DIR, "*.json")))
FAMILY = {"glance_qwen_image_t2i.json": "qwen-image", "glance_flux_t2i.json": "flux",
          "glance_train_pair.json": "qwen-image", "glance_compare.json": "qwen-image"}
MODEL_EXTS = (".safetensors", ".sft", ".gguf", ".ckpt", ".pt", ".pth", ".bin")
ARTIFACTS = os.path.join(comfy_runtime.PACK_ROOT, "test-artifacts")


@pytest.fixture(scope="module")
def graph(comfy, tmp_path_factory):
    comfy_exec.init_nodes(str(tmp_path_factory.mktemp("graph")))
    return comfy_exec


def _load(name):
    with open(os.path.join(WF_DIR, name), encoding="utf-8") as fh:
        return json.load(fh)


def test_every_workflow_has_a_thumbnail_and_a_family():
    assert set(WORKFLOWS) == set(FAMILY)
    for name in WORKFLOWS:
        jpg = os.path.join(WF_DIR, name[:-5] + ".jpg")
        assert os.path.isfile(jpg), f"{name} has no thumbnail"
        with open(jpg, "rb") as fh:
            assert fh.read(3) == b"\xff\xd8\xff"  # a JPEG


def _check_value(where, kind, opts, value):
    if kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
        assert opts.get("min", value) <= value <= opts.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where
    elif kind == "CONTROL":
        assert value in ("fixed", "increment", "decrement", "randomize"), where
    elif kind == "UPLOAD":
        assert value == "image", where
    else:  # COMBO: model files need not exist here; every other choice must be one of the options
        assert isinstance(value, str), where
        if not value.endswith(MODEL_EXTS + (".png", ".jpg")):
            assert value in opts["options"], f"{where}: {value!r} not in {opts['options']}"


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_matches_live_node_schemas(graph, name):
    ui = _load(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui["links"]}
    assert ui["last_node_id"] >= max(nodes) and ui["last_link_id"] >= max(links)
    for n in ui["nodes"]:
        if n["type"] in graph.FRONTEND_ONLY:  # e.g. a Note: drawn by the web UI, never executed
            continue
        cls = graph.node_class(n["type"])
        assert cls is not None, f"node {n['id']}: {n['type']} is not a registered node"
        linked = {i["name"] for i in n.get("inputs", []) if i.get("link") is not None}
        specs = graph.widget_specs(cls, linked)
        values = n.get("widgets_values", [])
        assert len(values) == len(specs), f"{name} node {n['id']} {n['type']}: {len(values)} widget values for " \
                                          f"{[s[0] for s in specs]}"
        for (wname, kind, opts), value in zip(specs, values):
            _check_value(f"{name} node {n['id']} {n['type']}.{wname}", kind, opts, value)
        in_types = {iname: kind for iname, kind, _, _ in graph.input_specs(cls)}
        required = {iname for iname, kind, _, opt in graph.input_specs(cls) if not opt and kind not in graph.WIDGET_TYPES}
        assert required <= linked, f"{name} node {n['id']} {n['type']}: unconnected {required - linked}"
        for i in n.get("inputs", []):
            assert i["name"] in in_types, f"{n['type']} has no input {i['name']}"
            assert i["type"] == in_types[i["name"]] or in_types[i["name"]] == "*"
        assert [o["type"] for o in n.get("outputs", [])] == list(cls.RETURN_TYPES)
    for lid, src, sslot, dst, dslot, typ in ui["links"]:
        out = nodes[src]["outputs"][sslot]
        inp = nodes[dst]["inputs"][dslot]
        assert lid in out["links"] and inp["link"] == lid, f"link {lid} is not mirrored in its nodes"
        assert out["type"] == typ == inp["type"], f"link {lid}: {out['type']} -> {inp['type']} as {typ}"
    for n in ui["nodes"]:  # no dangling link ids
        for o in n.get("outputs", []):
            assert all(l in links for l in o["links"] or [])


def _write_inputs(family, workflow):
    """Tiny LoRA files under the names the workflow picks (official layout for Qwen, diffusers for FLUX), and
    the reference image a LoadImage node asks for."""
    import folder_paths
    from PIL import Image
    for n in workflow["nodes"]:
        if n["type"] == "LoadImage":
            img = Image.new("RGB", (320, 256), (200, 60, 40))
            img.paste((30, 90, 220), (80, 64, 240, 192))
            img.save(os.path.join(folder_paths.get_input_directory(), n["widgets_values"][0]))
    loader = next((n for n in workflow["nodes"] if n["type"] == "GlanceLoRAPairLoader"), None)
    if loader is None:
        return
    for seed, name in enumerate(loader["widgets_values"][:2]):
        path = os.path.join(comfy_runtime.loras_dir(), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if family == "qwen-image":
            sd = lf.official_qwen_tensors(blocks=2, rank=4, dim=32, mlp=128, mod=192, seed=seed)
        else:
            sd = lf.flux_diffusers_tensors(hidden=64, rank=4, seed=seed)
        lf.write(path, sd)


def substitute_stand_ins(prompt, family, size=64):
    """Swap the real model, text-encoder and VAE loaders for the tiny stand-ins; shrink the latent."""
    out = {}
    for nid, node in prompt.items():
        ct, inp = node["class_type"], node["inputs"]
        if ct in ("CLIPLoader", "DualCLIPLoader"):
            continue
        if ct == "UNETLoader":
            node = {"class_type": "GlanceTestTinyModel", "inputs": {"family": family}}
        elif ct == "VAELoader":
            node = {"class_type": "GlanceTestTinyVAE", "inputs": {"family": family}}
        elif ct == "CLIPTextEncode":
            node = {"class_type": "GlanceTestConditioning", "inputs": {"family": family, "text": inp["text"]}}
        elif ct == "EmptySD3LatentImage":
            node = {"class_type": ct, "inputs": {**inp, "width": size, "height": size}}
        elif ct == "GlanceTrainLoRAPair":  # a few CPU steps at the smallest size
            node = {"class_type": ct, "inputs": {**inp, "steps": 3, "resolution": 256, "training_dtype": "fp32",
                                                 "output_name": "workflow_test", "overwrite": True}}
        out[nid] = node
    return out


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_to_an_image_with_tiny_stand_ins(graph, name):
    from PIL import Image
    import folder_paths
    ui = _load(name)
    family = FAMILY[name]
    _write_inputs(family, ui)
    prompt = substitute_stand_ins(graph.ui_to_api(ui), family)
    assert {n["class_type"] for n in prompt.values()} >= {"GlanceSampler", "VAEDecode", "SaveImage"}
    executor, server = graph.run_prompt(prompt)
    errors = [d for e, d in server.messages if e == "execution_error"]
    assert executor.success, errors
    save_id = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    images = executor.history_result["outputs"][save_id]["images"]
    assert len(images) == 1
    path = os.path.join(folder_paths.get_output_directory(), images[0]["subfolder"], images[0]["filename"])
    img = Image.open(path)
    assert img.size == (64, 64) and img.mode == "RGB"
    os.makedirs(ARTIFACTS, exist_ok=True)
    img.resize((256, 256), Image.NEAREST).save(os.path.join(ARTIFACTS, name[:-5] + "_tiny_output.png"))
    for nid, node in prompt.items():
        if node["class_type"] == "GlanceTrainLoRAPair":  # the pair was written and its loss curve previewed
            glance = os.path.join(comfy_runtime.loras_dir(), "glance")
            assert os.path.isfile(os.path.join(glance, "workflow_test_slow.safetensors"))
            assert os.path.isfile(os.path.join(glance, "workflow_test_fast.safetensors"))
            preview = next(k for k, v in prompt.items() if v["class_type"] == "PreviewImage")
            shown = executor.history_result["outputs"][preview]["images"][0]
            curve = Image.open(os.path.join(folder_paths.get_temp_directory(), shown["subfolder"], shown["filename"]))
            assert curve.size == (640, 360)
            curve.save(os.path.join(ARTIFACTS, "workflow_loss_curve.png"))
