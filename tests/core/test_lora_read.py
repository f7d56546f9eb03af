import json
import os
import pickle

import pytest
import torch

import lora_files as lf
import tiny_pipelines
from glance_core.errors import LoraFileError, LoraMismatchError
from glance_core.lora import check_matches, read_lora


def test_official_glance_layout(tmp_path):
    sd = lf.official_qwen_tensors(blocks=2, rank=4)
    path = lf.write(tmp_path / "glance_qwen_slow.safetensors", sd)
    lora = read_lora(path)
    assert lora.layout == "glance-official" and lora.namespace == "diffusers"
    assert len(lora.modules) == 24 and lora.ranks == [4] and lora.family == "qwen-image"
    # All 12 module types are read, the attention ones (".lora.down" naming) included.
    assert {n.split(".", 2)[2] for n in lora.modules} == set(lf.QWEN_ATTN + lf.QWEN_OTHER)
    assert all(m.scale == 4.0 for m in lora.modules.values())
    assert "as trained: scale 4" in lora.scale_note and "alpha = 4 x rank" in lora.scale_note
    m = lora.modules["transformer_blocks.1.attn.to_q"]
    key = "transformer.transformer_blocks.1.attn.to_q"
    want = 4.0 * sd[key + ".lora.up.weight"].float() @ sd[key + ".lora.down.weight"].float()
    torch.testing.assert_close(m.delta(), want)

    stored = read_lora(path, "as stored")
    assert all(m.scale == 1.0 for m in stored.modules.values())
    assert "as stored: scale 1" in stored.scale_note and "would differ" in stored.scale_note


def test_official_layout_needs_its_signature(tmp_path):
    # Same names but uniform lora_A/B naming: a plain diffusers file, scale unknown -> 1.0 and said so.
    sd = {k.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
          for k, v in lf.official_qwen_tensors(blocks=1).items()}
    lora = read_lora(lf.write(tmp_path / "plain.safetensors", sd))
    assert lora.layout == "diffusers"
    assert all(m.scale == 1.0 for m in lora.modules.values())
    assert "trained scale is unknown" in lora.scale_note


def _randomise_lora_b(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_diffusers_file_with_adapter_metadata(tmp_path):
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model = tiny_pipelines.tiny_flux_transformer(in_channels=16)
    cfg = LoraConfig(r=4, lora_alpha=16, alpha_pattern={"to_q": 8},
                     target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model.add_adapter(cfg)
    _randomise_lora_b(model)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    lora = read_lora(tmp_path / "pytorch_lora_weights.safetensors")
    assert lora.layout == "diffusers" and lora.family == "flux.1-dev"
    want = tiny_pipelines.peft_deltas(model)
    assert set(lora.modules) == set(want) and len(want) == 7  # single blocks have no to_out
    for name, delta in want.items():
        torch.testing.assert_close(lora.modules[name].delta(), delta, rtol=1e-5, atol=1e-6)
    assert lora.modules["transformer_blocks.0.attn.to_q"].scale == 2.0  # alpha_pattern 8 / r 4
    assert lora.modules["transformer_blocks.0.attn.to_k"].scale == 4.0  # lora_alpha 16 / r 4
    assert "peft adapter config" in lora.scale_note


def test_peft_save_pretrained_with_adapter_config_beside(tmp_path):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_pipelines.tiny_flux_transformer(in_channels=16),
                           LoraConfig(r=2, lora_alpha=6, use_rslora=True, target_modules=["to_q", "to_v"]))
    _randomise_lora_b(model)
    model.save_pretrained(tmp_path)
    lora = read_lora(tmp_path / "adapter_model.safetensors")
    assert lora.layout == "peft"
    want = tiny_pipelines.peft_deltas(model)
    assert set(lora.modules) == set(want)
    for name, delta in want.items():
        torch.testing.assert_close(lora.modules[name].delta(), delta, rtol=1e-5, atol=1e-6)
    assert lora.modules["transformer_blocks.0.attn.to_q"].scale == pytest.approx(6 / 2 ** 0.5)


def test_kohya_and_comfyui_layouts(tmp_path):
    names = ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"]
    k = read_lora(lf.write(tmp_path / "k.safetensors", lf.kohya_tensors(names, rank=4, alpha=8.0)), "as stored")
    assert k.layout == "kohya" and k.namespace == "kohya" and k.family == "flux.1-dev"
    assert set(k.modules) == {"double_blocks_0_img_attn_qkv", "single_blocks_0_linear1"}
    assert all(m.scale == 2.0 and m.alpha == 8.0 for m in k.modules.values())  # stored alpha wins in both policies
    c = read_lora(lf.write(tmp_path / "c.safetensors", lf.comfy_tensors(names, rank=4, alpha=2.0)))
    assert c.layout == "comfyui" and set(c.modules) == set(names)
    assert all(m.scale == 0.5 for m in c.modules.values())
    assert "from the alpha stored" in c.scale_note


def test_text_encoder_tensors_are_reported_not_applied(tmp_path):
    sd = lf.kohya_tensors(["double_blocks.0.img_attn.qkv"])
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    lora = read_lora(lf.write(tmp_path / "te.safetensors", sd))
    assert len(lora.modules) == 1
    assert lora.ignored == ["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight (text encoder)"]


# ---- bad input: every error names the file -------------------------------------------------------

class _Evil:
    def __reduce__(self):
        return (open, (os.environ["GLANCE_PWNED"], "w"))


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.bin", "evil.safetensors"])
def test_pickles_are_refused_without_unpickling(tmp_path, monkeypatch, name):
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("GLANCE_PWNED", str(marker))
    path = tmp_path / name
    if name.endswith(".safetensors"):
        torch.save({"x": _Evil()}, path)  # a torch zip checkpoint under a safetensors name
    else:
        path.write_bytes(pickle.dumps(_Evil(), protocol=2))
    with pytest.raises(LoraFileError, match="pickle") as e:
        read_lora(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_corrupt_and_truncated_files(tmp_path):
    good = lf.write(tmp_path / "good.safetensors", lf.comfy_tensors(["a.b"]))
    data = good.read_bytes()
    cases = {
        "text.safetensors": (b"hello, I am not a tensor file", "not a safetensors file"),
        "tiny.safetensors": (b"abc", "only 3 bytes"),
        "cut_header.safetensors": (data[:40], "truncated: header says"),
        "cut_data.safetensors": (data[:-10], "truncated: tensor"),
        "garbage.safetensors": (data[:8] + b"{" * (len(data) - 8), "corrupt safetensors header"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(LoraFileError, match=msg) as e:
            read_lora(p)
        assert str(e.value).startswith(str(p))
    with pytest.raises(LoraFileError, match="file not found"):
        read_lora(tmp_path / "missing.safetensors")


def test_structural_errors(tmp_path):
    def err(sd, msg):
        with pytest.raises(LoraFileError, match=msg):
            read_lora(lf.write(tmp_path / "x.safetensors", sd))
    err({"model.layer.weight": torch.zeros(2, 2)}, "not LoRA down/up/alpha weights")
    err({"lora_te_x.lora_down.weight": torch.zeros(2, 2), "lora_te_x.lora_up.weight": torch.zeros(2, 2)},
        "only text-encoder LoRA tensors")
    err({"diffusion_model.a.lora_down.weight": torch.zeros(4, 8), "diffusion_model.a.lora_up.weight": torch.zeros(8, 3)},
        "disagree on the rank")
    err({"diffusion_model.a.lora_down.weight": torch.zeros(4, 8)}, "needs both down and up")
    err({"diffusion_model.a.lora_down.weight": torch.zeros(4, 8, 1), "diffusion_model.a.lora_up.weight": torch.zeros(8, 4)},
        "not a LoRA pair")
    mixed = {**lf.comfy_tensors(["a.b"]), **lf.kohya_tensors(["c.d"])}
    err(mixed, "mixes key prefixes")
    err({"diffusion_model.a.dora_scale": torch.zeros(4)}, "DoRA")
    with pytest.raises(LoraFileError, match="unknown scale policy"):
        read_lora(lf.write(tmp_path / "y.safetensors", lf.comfy_tensors(["a.b"])), "as wished")


def test_file_for_another_family_is_reported(tmp_path):
    lora = read_lora(lf.write(tmp_path / "qwen.safetensors", lf.official_qwen_tensors(blocks=1)))
    flux_layers = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"]
    with pytest.raises(LoraMismatchError) as e:
        check_matches(lora, flux_layers, "the FLUX model")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "qwen.safetensors"))
    assert "matched 0 of 12 LoRA modules to layers of the FLUX model" in msg
    assert "transformer_blocks.0." in msg and "looks like a qwen-image LoRA" in msg


def test_matching_kohya_names_and_key_map(tmp_path):
    lora = read_lora(lf.write(tmp_path / "k.safetensors", lf.kohya_tensors(["double_blocks.0.img_attn.qkv", "x.y"])))
    matched, unmatched = check_matches(lora, ["double_blocks.0.img_attn.qkv", "other"])
    assert matched == {"double_blocks_0_img_attn_qkv": "double_blocks.0.img_attn.qkv"} and unmatched == ["x_y"]
    with pytest.raises(LoraMismatchError, match="matched 1 of 2"):
        check_matches(lora, ["double_blocks.0.img_attn.qkv"], strict=True)
    matched, unmatched = check_matches(lora, ["fused"], key_map={"x_y": "fused"})
    assert matched == {"x_y": "fused"}


def test_cli_inspect(tmp_path, capsys):
    from glance_core.cli import main
    path = lf.write(tmp_path / "o.safetensors", lf.official_qwen_tensors(blocks=1))
    assert main(["inspect", str(path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layout"] == "glance-official" and out["modules"] == 12 and "scale 4" in out["scale"]
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_unprefixed_peft_names_and_the_log_line(tmp_path, caplog):
    import logging
    sd = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(2, 8),
          "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(8, 2)}
    with caplog.at_level(logging.INFO, logger="glance"):
        lora = read_lora(lf.write(tmp_path / "bare.safetensors", sd))
    assert lora.namespace == "diffusers" and list(lora.modules) == ["transformer_blocks.0.attn.to_q"]
    assert any("bare.safetensors: diffusers layout" in r.getMessage() and "scale 1" in r.getMessage()
               for r in caplog.records)


def test_header_length_that_looks_like_pickle_magic(tmp_path):
    # A valid safetensors file whose 8-byte header length starts with 0x80 0x02 (like pickle protocol 2).
    tensors = lf.comfy_tensors(["a.b"])
    for pad in range(0, 800):
        path = lf.write(tmp_path / "p.safetensors", tensors, {"pad": "x" * pad})
        head = path.read_bytes()[:2]
        if head == b"\x80\x02":
            break
    else:
        pytest.fail("could not craft the header length")
    assert list(read_lora(path).modules) == ["a.b"]
