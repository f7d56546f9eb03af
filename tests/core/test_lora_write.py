import json

import pytest
import torch
from safetensors import safe_open

import lora_files as lf
from glance_core import __version__
from glance_core.errors import LoraFileError
from glance_core.lora import GlanceMeta, read_lora, save_lora
from glance_core.lora import writer as writer_mod
from glance_core.schedule import build_schedule


def _meta(phase="slow", rank=4, alpha=16.0):
    sched = build_schedule("qwen-image", 1024, 1024)
    return GlanceMeta(phase=phase, family="qwen-image", sigmas=sched.phase_sigmas(phase), rank=rank, alpha=alpha,
                      target_modules=["attn.to_q"], schedule=sched.to_dict(), image_sha256="ab" * 32)


def _as_modules(lora):
    return {n: (m.down, m.up, m.scale * m.rank) for n, m in lora.modules.items()}


LAYOUTS = {
    "glance-official": lambda: lf.official_qwen_tensors(blocks=1),
    "kohya": lambda: lf.kohya_tensors(["double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"]),
    "comfyui": lambda: lf.comfy_tensors(["transformer_blocks.0.img_mod.1", "transformer_blocks.0.attn.to_q"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("namespace", ["comfyui", "diffusers"])
def test_round_trip_keeps_every_delta(tmp_path, layout, namespace):
    src = read_lora(lf.write(tmp_path / "src.safetensors", LAYOUTS[layout]()))
    assert src.layout == layout
    out = save_lora(tmp_path / "out.safetensors", _as_modules(src), _meta().to_header(), namespace=namespace)
    back = read_lora(out, "as stored")  # alpha is now explicit, so even "as stored" keeps the trained scale
    assert back.layout == "glance" and set(back.modules) == set(src.modules)
    for name, m in src.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta())
        assert back.modules[name].alpha == pytest.approx(m.scale * m.rank)


def test_written_keys_are_what_comfyui_reads(tmp_path):
    src = read_lora(lf.write(tmp_path / "src.safetensors", lf.official_qwen_tensors(blocks=1)))
    out = save_lora(tmp_path / "out.safetensors", _as_modules(src), dtype=torch.bfloat16)
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        k = "diffusion_model.transformer_blocks.0.attn.to_q"
        assert {k + ".lora_up.weight", k + ".lora_down.weight", k + ".alpha"} <= keys
        assert f.get_tensor(k + ".alpha").item() == 16.0  # 4 x rank, explicit
        assert f.get_tensor(k + ".lora_up.weight").dtype == torch.bfloat16
    assert len(keys) == 36


def test_glance_metadata_round_trip(tmp_path):
    meta = _meta("fast", rank=4, alpha=16.0)
    meta.extra = {"steps": 60}
    out = save_lora(tmp_path / "f.safetensors", {"a.b": (torch.randn(4, 8), torch.randn(8, 4), 16.0)},
                    meta.to_header())
    lora = read_lora(out)
    assert lora.glance == meta and lora.family == "qwen-image" and lora.glance.pack_version == __version__
    assert lora.glance.sigmas == build_schedule("qwen-image", 1024, 1024).phase_sigmas("fast")
    assert lora.metadata["ss_network_dim"] == "4" and lora.metadata["ss_network_alpha"] == "16.0"
    assert lora.modules["a.b"].scale == 4.0


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: "not json", "not valid JSON"),
    (lambda d: {**d, "schema_version": 99}, "newer than this pack"),
    (lambda d: {k: v for k, v in d.items() if k != "schema_version"}, "no schema_version"),
    (lambda d: {k: v for k, v in d.items() if k != "sigmas"}, "missing sigmas"),
    (lambda d: {**d, "phase": "medium"}, "phase must be one of"),
    (lambda d: {**d, "sigmas": [1.5]}, "sigmas must be"),
    (lambda d: {**d, "rank": 0}, "rank must be"),
])
def test_bad_glance_metadata(tmp_path, mutate, msg):
    d = json.loads(_meta().to_header()["glance"])
    new = mutate(d)
    path = lf.write(tmp_path / "m.safetensors", lf.comfy_tensors(["a.b"]),
                    {"glance": new if isinstance(new, str) else json.dumps(new)})
    with pytest.raises(LoraFileError, match=msg) as e:
        read_lora(path)
    assert str(e.value).startswith(str(path))


def test_unknown_metadata_fields_are_kept(tmp_path):
    d = json.loads(_meta().to_header()["glance"])
    d["future_field"] = [1, 2]
    path = lf.write(tmp_path / "m.safetensors", lf.comfy_tensors(["a.b"]), {"glance": json.dumps(d)})
    assert read_lora(path).glance.extra["future_field"] == [1, 2]


def test_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "x.safetensors"
    mods = {"a.b": (torch.ones(2, 4), torch.ones(4, 2), 2.0)}
    save_lora(path, mods)
    before = path.read_bytes()
    with pytest.raises(LoraFileError, match="file exists"):
        save_lora(path, {"a.b": (torch.zeros(2, 4), torch.zeros(4, 2), 2.0)})
    assert path.read_bytes() == before
    save_lora(path, {"a.b": (torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}, overwrite=True)
    assert read_lora(path).modules["a.b"].delta().abs().sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temporary left


@pytest.mark.parametrize("overwrite", [False, True])
def test_interrupted_save_leaves_nothing_under_the_final_name(tmp_path, monkeypatch, overwrite):
    path = tmp_path / "y.safetensors"
    if overwrite:
        save_lora(path, {"a.b": (torch.ones(2, 4), torch.ones(4, 2), 2.0)})
    before = path.read_bytes() if overwrite else None

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)  # half a file, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_lora(path, {"a.b": (torch.zeros(2, 4), torch.zeros(4, 2), 2.0)}, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["y.safetensors"] if overwrite else [])
    if overwrite:
        assert path.read_bytes() == before


def test_save_needs_modules(tmp_path):
    with pytest.raises(LoraFileError, match="nothing to save"):
        save_lora(tmp_path / "z.safetensors", {})
