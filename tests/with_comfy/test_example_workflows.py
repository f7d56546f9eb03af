"""The example workflows against the live node schemas, then executed in real ComfyUI with tiny stand-ins."""
import glob
import json
import os
import re
import shutil

import pytest

import comfy_exec
import comfy_runtime
import lora_files as lf

WF_DIR = os.path.join(comfy_runtime.PACK_ROOT, "example_workflows")
WORKFLOWS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(WF_DIR, "*.json")))
QWEN, FLUX, TRAIN = ("Glance Qwen-Image 10 steps, official pair.json", "Glance FLUX 10 steps, a pair you trained.json",
                     "Glance train a pair from one image.json")
COMPARE = "Glance compare 50 steps, plain 10 and Glance 10.json"
FAMILY = {QWEN: "qwen-image", FLUX: "flux", TRAIN: "qwen-image", COMPARE: "qwen-image"}
OFFICIAL_PAIR = ("glance_qwen_slow.safetensors", "glance_qwen_fast.safetensors")
# The ComfyUI model folder each loader reads its widget's file from (ComfyUI's folder_paths names).
LOADER_FOLDER = {"UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
                 "VAELoader": "vae", "GlanceLoRAPairLoader": "loras"}
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
    for n in workflow["nodes"]:
        if n["type"] == "LoadImage":  # the image ComfyUI ships in its input folder, copied to the test's
            shutil.copyfile(os.path.join(comfy_runtime.find_comfyui()[0], "input", n["widgets_values"][0]),
                            os.path.join(folder_paths.get_input_directory(), n["widgets_values"][0]))
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


def _model_files(ui):
    """[(node type, file name, folder)] of every model file the workflow's loaders pick."""
    return [(n["type"], v, LOADER_FOLDER[n["type"]]) for n in ui["nodes"] if n["type"] in LOADER_FOLDER
            for v in n["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]


def _note(ui):
    first = ui["nodes"][0]
    assert first["type"] in ("MarkdownNote", "Note") and first["order"] == 0, "the first node must be the note"
    assert sorted(n["order"] for n in ui["nodes"]) == list(range(len(ui["nodes"])))
    xs = [n["pos"][0] for n in ui["nodes"][1:]]
    assert first["pos"][0] + first["size"][0] <= min(xs), "the note sits left of the graph, where reading starts"
    return first["widgets_values"][0]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_starts_with_a_note_naming_every_file_and_its_folder(name):
    ui = _load(name)
    text = _note(ui)
    for node_type, file, folder in _model_files(ui):
        if name == FLUX and node_type == "GlanceLoRAPairLoader":  # the pair the user trains first
            assert f"`ComfyUI/models/{folder}/{file}`" in text, f"{name}: the note does not name {file}"
            continue
        assert f"`{file}`" in text, f"{name}: the note does not name {file}"
        assert f"`ComfyUI/models/{folder}/`" in text, f"{name}: the note does not name the folder of {file}"
    if name == QWEN:
        assert "CSU-JPG/Glance" in text and all(f in text for f in OFFICIAL_PAIR)
    if name == FLUX:
        assert "No official FLUX pair" in text and "my_flux_pair" in text
    for expected in ("What to expect", "10 steps"):
        assert expected in text, f"{name}: {expected!r} missing from the note"
    if name != FLUX:  # the figures measured on the GPU, with card, date and the random-weights caveat
        assert "H100 80GB" in text and re.search(r"2026-11-2[67]", text) and "random weights" in text
        assert "24 GB" in text
    assert "<" not in text and "TODO" not in text  # no placeholders


@pytest.mark.parametrize("name", WORKFLOWS)
def test_loader_nodes_carry_the_download_metadata_the_frontend_reads(name):
    """properties.models {name, url, directory} on a loader is what ComfyUI's frontend lists in its missing-models
    dialog; every file with a public source has one, in the folder its loader reads."""
    ui = _load(name)
    for n in ui["nodes"]:
        if n["type"] not in LOADER_FOLDER:
            continue
        listed = {m["name"]: m for m in n.get("properties", {}).get("models", [])}
        for v in n["widgets_values"]:
            if not (isinstance(v, str) and v.endswith(".safetensors")):
                continue
            if name == FLUX and n["type"] == "GlanceLoRAPairLoader":  # trained by the user: no download
                assert v not in listed
                continue
            m = listed[v]
            assert m["directory"] == LOADER_FOLDER[n["type"]] and m["url"].startswith("https://huggingface.co/")
            assert m["url"].endswith("/" + v)
            if v in OFFICIAL_PAIR:
                assert m["url"] == f"https://huggingface.co/CSU-JPG/Glance/resolve/main/{v}"


def test_model_files_have_the_names_comfyuis_own_templates_use():
    """Every base-model file a template picks is one ComfyUI's official templates use, from the same folder and
    source (read from the comfyui_workflow_templates package that ships ComfyUI's templates)."""
    pytest.importorskip("comfyui_workflow_templates")
    import comfyui_workflow_templates as cwt
    official = {}
    for path in glob.glob(os.path.join(os.path.dirname(cwt.__file__), "templates", "*.json")):
        try:
            with open(path, encoding="utf-8") as fh:
                ui = json.load(fh)
        except (ValueError, UnicodeDecodeError):
            continue
        for n in ui.get("nodes", []) if isinstance(ui, dict) else []:
            for m in (n.get("properties") or {}).get("models", []) or []:
                official.setdefault(m.get("name"), set()).add((m.get("directory"), m.get("url")))
    assert official, "no model metadata found in ComfyUI's templates"
    for name in WORKFLOWS:
        for n in _load(name)["nodes"]:
            for m in (n.get("properties") or {}).get("models", []):
                if m["name"] in OFFICIAL_PAIR:
                    continue
                assert (m["directory"], m["url"]) in official.get(m["name"], set()), (name, m)


def test_the_training_image_ships_with_comfyui(comfy):
    ui = _load(TRAIN)
    (image,) = [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "LoadImage"]
    assert os.path.isfile(os.path.join(comfy_runtime.find_comfyui()[0], "input", image)), image
    assert f"`{image}`" in _note(ui) and "`ComfyUI/input/`" in _note(ui)


def test_titles_read_well_in_browse_templates():
    """The frontend shows a custom-node template's file name as its title and, with '-' and '_' turned into
    spaces, as its description; the category is the pack's folder name, translated by locales/<lang>/main.json."""
    for name in WORKFLOWS:
        title = name[:-5]
        assert title.startswith("Glance ") and "_" not in title and len(title) <= 48, title
        assert ui_description(title).split() == title.replace("-", " ").split()
    with open(os.path.join(comfy_runtime.PACK_ROOT, "locales", "en", "main.json"), encoding="utf-8") as fh:
        category = json.load(fh)["templateWorkflows"]["category"]
    # the folder names the README's install routes give: git clone into glance, the default clone, the registry id
    import tomllib
    with open(os.path.join(comfy_runtime.PACK_ROOT, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)["project"]
    repo = project["urls"]["Repository"].rstrip("/").split("/")[-1]
    assert {"glance", repo, project["name"]} <= set(category)
    assert len(set(category.values())) == 1


def ui_description(title):
    """What the frontend (1.27 and later) shows as a custom template's description."""
    import re
    return re.sub(r"[-_]", " ", title).strip()


def test_a_missing_lora_stops_before_running_with_what_to_do(graph):
    prompt = {
        "1": {"class_type": "GlanceTestTinyModel", "inputs": {"family": "qwen-image"}},
        "2": {"class_type": "GlanceLoRAPairLoader", "inputs": {
            "model": ["1", 0], "slow_lora": "glance_qwen_slow_absent.safetensors", "fast_lora": "",
            "strength_slow": 1.0, "strength_fast": 1.0, "scale_policy": "as trained"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }
    with pytest.raises(AssertionError) as e:
        graph.run_prompt(prompt)
    msg = str(e.value)
    assert "slow_lora: LoRA file 'glance_qwen_slow_absent.safetensors' not found" in msg
    assert "CSU-JPG/Glance" in msg and "press R" in msg
    assert "Value not in list" not in msg
