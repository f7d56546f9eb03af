"""Hostile input, every class: malformed headers, pathological peft patterns, non-finite weights, absurd
metadata, extreme schedule sizes, wrong command-line values. Each is refused by name, in bounded time."""
import json
import math
import os
import re
import struct
import subprocess
import sys
import time

import pytest
import torch

import lora_files as lf
from glance_core.errors import GlanceError, LoraFileError, ScheduleError
from glance_core.lora import GlanceMeta, check_pair_phases, read_lora
from glance_core.lora.patterns import PatternError, PatternSet, compile_key
from glance_core.schedule import Schedule, build_schedule, model_size

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MOD = "transformer.transformer_blocks.0.attn.to_q"


def _raw(path, header, data=b""):
    """Write a safetensors file byte by byte from a header dict (or raw JSON text) and a data section."""
    text = header if isinstance(header, str) else json.dumps(header)
    body = text.encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body + data)
    return path


def _pair_header(down_off=(0, 32), up_off=(32, 64), down_shape=(2, 4), up_shape=(4, 2)):
    return {MOD + ".lora_A.weight": {"dtype": "F32", "shape": list(down_shape), "data_offsets": list(down_off)},
            MOD + ".lora_B.weight": {"dtype": "F32", "shape": list(up_shape), "data_offsets": list(up_off)}}


def _nested(depth):
    return '{"a": ' + "[" * depth + "]" * depth + "}"


MALFORMED = {
    "overlapping offsets": (_pair_header(up_off=(16, 48)), 48, "overlaps"),
    "gap between tensors": (_pair_header(up_off=(40, 72)), 72, "unused bytes"),
    "bytes after the last tensor": (_pair_header(), 80, "belong to none"),
    "negative shape": (_pair_header(down_shape=(-2, -4)), 64, "non-negative whole numbers"),
    "fractional shape": (_pair_header(down_shape=(2.5, 4)), 64, "non-negative whole numbers"),
    "shape not a list": ({**_pair_header(), MOD + ".lora_A.weight": {"dtype": "F32", "shape": "2x4",
                                                                    "data_offsets": [0, 32]}}, 64, "shape"),
    "unknown dtype": ({**_pair_header(), MOD + ".lora_A.weight": {"dtype": "F33", "shape": [2, 4],
                                                                 "data_offsets": [0, 32]}}, 64, "dtype"),
    "entry not an object": ({**_pair_header(), MOD + ".lora_A.weight": [1, 2]}, 64, "not an object"),
    "offsets of wrong length": ({**_pair_header(), MOD + ".lora_A.weight": {"dtype": "F32", "shape": [2, 4],
                                                                           "data_offsets": [0]}}, 64, "data_offsets"),
    "metadata not an object": ({**_pair_header(), "__metadata__": ["x"]}, 64, "__metadata__"),
    "metadata value not a string": ({**_pair_header(), "__metadata__": {"glance": {"phase": "slow"}}}, 64,
                                    "__metadata__"),
    "deeply nested JSON": (_nested(200000), 0, "not valid JSON"),
    "header a JSON list": ("[1, 2]", 0, "no valid header"),
    "header a JSON string": ("{\"a\": 1", 0, "not valid JSON"),
    "size mismatch": (_pair_header(down_off=(0, 30), up_off=(30, 64)), 64, "bytes for shape"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_header_is_a_named_error(tmp_path, case):
    header, nbytes, msg = MALFORMED[case]
    path = _raw(tmp_path / "bad.safetensors", header, b"\0" * nbytes)
    with pytest.raises(LoraFileError, match=re.escape(msg)) as e:
        read_lora(path)
    assert str(e.value).startswith(str(path))


def test_cli_inspect_names_every_malformed_file_without_traceback(tmp_path, capsys):
    for k, case in enumerate(sorted(MALFORMED)):
        header, nbytes, msg = MALFORMED[case]
        path = _raw(tmp_path / f"bad{k}.safetensors", header, b"\0" * nbytes)
        code, err = _main(capsys, "inspect", str(path))
        assert code == 2 and err.startswith(f"error: {path}: ") and msg in err, (case, err)
    # And as a process: one line on stderr, no traceback.
    out = _cli("inspect", str(path))
    assert out.returncode == 2 and out.stderr.startswith(f"error: {path}: ") and "Traceback" not in out.stderr


def _peft_file(tmp_path, cfg, names=("transformer_blocks.0.attn.to_q",), name="peft.safetensors", rank=2):
    sd = {}
    for n in names:
        sd[f"transformer.{n}.lora_A.weight"] = torch.ones(rank, 4)
        sd[f"transformer.{n}.lora_B.weight"] = torch.ones(4, rank)
    meta = {"lora_adapter_metadata": cfg if isinstance(cfg, str) else json.dumps(cfg)}
    return lf.write(tmp_path / name, sd, meta)


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*c", "(.*a){12}x", "((a*)*)*b", "(a|a?)+$"])
def test_pathological_alpha_pattern_reads_in_bounded_time(tmp_path, pattern):
    # Python's backtracking re needs exponential time for these on a long run of "a"; peft would hang.
    names = ["transformer_blocks.0." + "a" * 40 + "!", "transformer_blocks.0.attn.to_q"]
    path = _peft_file(tmp_path, {"lora_alpha": 8, "alpha_pattern": {pattern: 2, "attn.to_q": 6}}, names)
    t = time.monotonic()
    try:
        lora = read_lora(path)
    except LoraFileError as e:  # refusing as too complex is allowed, if it names the file and the field
        assert str(path) in str(e) and "alpha_pattern" in str(e)
    else:
        assert lora.modules["transformer_blocks.0.attn.to_q"].scale == pytest.approx(6 / 2)
    assert time.monotonic() - t < 20


def test_alpha_pattern_follows_peft_semantics():
    # Against peft's own rule, re.match(rf"(.*\.)?({key})$", name), on patterns re evaluates quickly.
    names = ["transformer_blocks.0.attn.to_q", "transformer_blocks.10.attn.to_out.0", "single_transformer_blocks."
             "3.proj_out", "x_embedder", "transformer_blocks.1.ff.net.2", "a.b.c"]
    patterns = ["to_q", "attn.to_q", r"attn\.to_q", "transformer_blocks.1.*", r"^transformer.*q$",
                r"blocks\.\d+\.attn\.to_(q|k)", r"[a-z_]+\.0\..*", "attn.to_out.0", "proj_(out|in)?", "to_q|to_k",
                r"\w+\.\w+", "[^.]+", "x_embed.er", "ff.net.[0-9]{1,2}", "b.c", "c", ".", "(?:blocks).0.attn.to_q",
                "transformer_blocks.1", "blocks.0.attn.to_q", "0.attn.to_q", r"\d", "attn.to_.*?"]
    for p in patterns:
        for n in names:
            assert compile_key(p).matches(n) == (re.match(rf"(.*\.)?({p})$", n) is not None), (p, n)
    # First matching key wins, as peft iterates the dict.
    assert PatternSet(["to_k", "attn.to_.", "to_q"]).lookup("blocks.0.attn.to_q") == "attn.to_."
    with pytest.raises(PatternError, match="not supported"):
        compile_key(r"(a)\1").matches("a.a")
    with pytest.raises(PatternError, match="not a valid regular expression"):
        compile_key("(unclosed")


def test_peft_config_fields_of_the_wrong_type_are_named(tmp_path):
    cases = [({"lora_alpha": "8"}, "lora_alpha"), ({"lora_alpha": 8, "alpha_pattern": ["to_q"]}, "alpha_pattern"),
             ({"lora_alpha": 8, "alpha_pattern": {"to_q": "x"}}, "alpha_pattern"),
             ({"lora_alpha": 8, "use_rslora": "yes"}, "use_rslora"), ({"lora_alpha": float("nan")}, "lora_alpha"),
             ("[1, 2]", "not an object"), ("{", "not valid JSON"), (_nested(100000), "not valid JSON"),
             ({"lora_alpha": 8, "alpha_pattern": {r"(x)(?=y)": 2}}, "alpha_pattern")]
    for k, (cfg, msg) in enumerate(cases):
        path = _peft_file(tmp_path, cfg, name=f"p{k}.safetensors")
        with pytest.raises(LoraFileError, match=re.escape(msg)) as e:
            read_lora(path)
        assert str(path) in str(e.value) and "lora_adapter_metadata" in str(e.value)


@pytest.mark.parametrize("where", ["down", "up", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_or_alpha_are_refused(tmp_path, where, value):
    sd = lf.kohya_tensors(["blocks.0.attn.to_q"], rank=2, fin=4, fout=4)
    key = next(k for k in sd if k.endswith({"down": "lora_down.weight", "up": "lora_up.weight",
                                             "alpha": ".alpha"}[where]))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = value
    path = lf.write(tmp_path / "nan.safetensors", sd)
    with pytest.raises(LoraFileError, match="NaN or infinite|not a finite number") as e:
        read_lora(path)
    assert str(e.value).startswith(str(path))


def _glance_file(tmp_path, name, phase="slow", family="flux.1-dev", edit=None, sched=None):
    sched = sched or build_schedule(family, 256, 256)
    meta = GlanceMeta(phase=phase, family=sched.family, sigmas=sched.phase_sigmas(phase), rank=2, alpha=4.0,
                      target_modules=["transformer_blocks.0.attn.to_q"], schedule=sched.to_dict())
    header = meta.to_header()
    if edit is not None:
        d = json.loads(header["glance"])
        edit(d)
        header["glance"] = json.dumps(d)
    sd = {MOD + ".lora_A.weight": torch.ones(2, 4), MOD + ".lora_B.weight": torch.ones(4, 2)}
    return lf.write(tmp_path / name, sd, header)


GLANCE_EDITS = {
    "base_steps 10^9": (lambda d: d["schedule"].update(base_steps=10 ** 9), "base_steps"),
    "schedule a list": (lambda d: d.update(schedule=[1, 2]), "schedule must be a JSON object"),
    "schedule steps missing": (lambda d: d["schedule"].pop("steps"), "schedule"),
    "schedule sigma NaN": (lambda d: d["schedule"]["steps"][0].update(sigma=float("nan")), "schedule"),
    "indices not from settings": (lambda d: d["schedule"]["slow"].update(indices=[0, 1, 2, 3, 4]), "indices"),
    "alpha NaN": (lambda d: d.update(alpha=float("nan")), "alpha"),
    "rank a bool": (lambda d: d.update(rank=True), "rank"),
    "rank a string": (lambda d: d.update(rank="4"), "rank"),
    "extra a list": (lambda d: d.update(extra=[1]), "extra"),
    "unknown family": (lambda d: d.update(family="sdxl"), "unknown model family"),
    "phase not a string": (lambda d: d.update(phase=["slow"]), "phase"),
    "sigmas not the schedule's": (lambda d: d.update(sigmas=[0.5]), "not the schedule's"),
    "target_modules of numbers": (lambda d: d.update(target_modules=[1, 2]), "target_modules"),
    "schema_version a bool": (lambda d: d.update(schema_version=True), "schema_version"),
}


@pytest.mark.parametrize("case", sorted(GLANCE_EDITS))
def test_absurd_glance_metadata_is_refused_at_load(tmp_path, case):
    edit, msg = GLANCE_EDITS[case]
    path = _glance_file(tmp_path, "g.safetensors", edit=edit)
    with pytest.raises(LoraFileError, match=re.escape(msg)) as e:
        read_lora(path)
    assert str(e.value).startswith(str(path)) and "Glance metadata" in str(e.value)


def test_pair_phase_check_is_shared_and_names_the_input(tmp_path):
    slow = read_lora(_glance_file(tmp_path, "s.safetensors", "slow"))
    fast = read_lora(_glance_file(tmp_path, "f.safetensors", "fast"))
    check_pair_phases(slow, fast)
    with pytest.raises(GlanceError, match=r"^--slow: f.safetensors is a fast LoRA"):
        check_pair_phases(fast, slow, ("--slow", "--fast"))
    qwen = read_lora(_glance_file(tmp_path, "q.safetensors", "fast", family="qwen-image"))
    with pytest.raises(GlanceError, match=r"^fast_lora: q.safetensors is a qwen-image LoRA"):
        check_pair_phases(slow, qwen, ("slow_lora", "fast_lora"))


def test_explicit_schedule_records_its_base_sigmas(tmp_path):
    base = [1.0 - i / 30 for i in range(30)]
    sched = build_schedule("explicit", 64, 64, base_sigmas=base)
    assert sched.base_sigmas == tuple(base)
    again = Schedule.from_dict(json.loads(sched.to_json()))
    assert again == sched
    lora = read_lora(_glance_file(tmp_path, "e.safetensors", sched=sched))
    stored = lora.glance.stored_schedule()
    assert stored.base_sigmas == tuple(base) and stored.boundary == sched.boundary
    # A preset schedule records none, and a file claiming otherwise is refused.
    assert "base_sigmas" not in build_schedule("sd3", 256, 256).to_dict()
    path = _glance_file(tmp_path, "x.safetensors", edit=lambda d: d["schedule"].update(base_sigmas=base))
    with pytest.raises(LoraFileError, match="base_sigmas recorded for preset"):
        read_lora(path)


from glance_shapes import family as SHAPES  # noqa: E402  (its family is passed in, not registered)

SIZES = [16, 1024, 4096, 8192, 11056, 12500, 16384, 100000]


@pytest.mark.parametrize("family", ["qwen-image", "flux.1-dev", "sd3", SHAPES.FAMILY], ids=str)
def test_every_size_gives_a_valid_schedule_or_a_clear_refusal(family):
    for side in SIZES:
        for w, h in ((side, side), (side, 16)):
            w, h = (v - v % 16 or 16 for v in (w, h))
            try:
                s = build_schedule(family, w, h)
            except ScheduleError as e:
                assert f"{w}x{h} px" in str(e) and "works up to about" in str(e), str(e)
                limit = int(re.search(r"up to about (\d+)x", str(e)).group(1))
                build_schedule(family, limit, limit)  # the size it names does work
                continue
            f32 = torch.tensor(s.sigmas, dtype=torch.float32)
            assert torch.isfinite(f32).all() and (f32[1:] < f32[:-1]).all(), (family, w, h, s.sigmas)
    with pytest.raises(ScheduleError, match="works up to about"):
        build_schedule("flux", 16384, 16384)  # was: every sigma 1.0
    with pytest.raises(ScheduleError, match="works up to about"):
        build_schedule("qwen-image", 16384, 16384)  # was: ZeroDivisionError


def test_latent_size_the_model_sees():
    # EmptyLatentImage at 1080x1920 gives 135x240 cells; 2x2-patch models pad to 136 rows.
    assert model_size("flux", 135, 240) == (1920, 1088)
    assert model_size("qwen-image", 128, 128) == (1024, 1024)
    build_schedule("flux", *model_size("flux", 135, 240))
    with pytest.raises(ScheduleError, match="empty"):
        model_size("sd3", 0, 8)


def test_explicit_sigmas_that_collapse_in_float32_are_refused():
    with pytest.raises(ScheduleError, match="float32"):
        build_schedule("explicit", base_sigmas=[1.0, 1.0 - 1e-12, 0.5, 0.25], slow_steps=1, slow_stride=1,
                       fast_steps=2)
    with pytest.raises(ScheduleError, match="must be numbers"):
        build_schedule("explicit", base_sigmas=["a", 0.5])
    with pytest.raises(ScheduleError, match="must lie in"):
        build_schedule("explicit", base_sigmas=[1.0, math.nan, 0.5])


def _main(capsys, *args):
    """Run the command line in this process (fast): (exit code, stderr)."""
    from glance_core.cli import main
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glance_core", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.fixture(scope="module")
def fake_flux(tmp_path_factory):
    """A folder that names a FLUX pipeline but holds no weights: validation must fail before any load."""
    d = tmp_path_factory.mktemp("fake_flux")
    (d / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return str(d)


def test_cli_validates_every_flag_before_loading(fake_flux, tmp_path, capsys, monkeypatch):
    img = tmp_path / "ref.png"
    from PIL import Image
    Image.new("RGB", (256, 256)).save(img)
    slow = _glance_file(tmp_path, "p_slow.safetensors", "slow")
    fast = _glance_file(tmp_path, "p_fast.safetensors", "fast")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    train = ["train", "--model", fake_flux, "--image", str(img), "--caption", "x", "--out-dir", str(tmp_path)]
    gen = ["generate", "--model", fake_flux, "--no-pair", "--prompt", "x", "--out", str(tmp_path / "o.png")]
    cases = [
        (train + ["--steps", "0"], "--steps 0"),
        (train + ["--alpha", "-4"], "--alpha -4"),
        (train + ["--alpha", "nan"], "--alpha nan"),
        (train + ["--lr", "0"], "--lr 0"),
        (train + ["--rank", "0"], "--rank 0"),
        (train + ["--caption-dropout", "1.5"], "--caption-dropout 1.5"),
        (train + ["--resolution", "1000000"], "--resolution 1000000"),
        (train + ["--seed", "-1"], "--seed -1"),
        (train + ["--device", "quantum"], "--device 'quantum'"),
        (train + ["--name", "../evil"], "--name"),
        (train + ["--name", "a" * 300], "--name"),
        (train[:-1] + [str(a_file)], "--out-dir"),
        (train[:-1] + [str(a_file / "sub")], "--out-dir: cannot create"),
        (["train", "--model", fake_flux, "--image", str(tmp_path / "no.png"), "--caption", "x"], "--image"),
        (train + ["--name", "p"], "exists; choose another name or pass --overwrite"),
        (gen + ["--num-images", "0"], "--num-images 0"),
        (gen + ["--device", "cuda:7"], "--device cuda:7"),
        (gen + ["--seed", str(2 ** 64)], "--seed"),
        (gen + ["--cfg", "nan"], "--cfg nan"),
        (gen + ["--width", "1000000"], "--width 1000000"),
        (gen + ["--width", "16384", "--height", "16384"], "works up to about"),
        (gen + ["--base-steps", "0"], "base_steps"),
        (gen[:-1] + [str(tmp_path / "missing" / "o.png")], "--out"),
        (gen[:-1] + [str(tmp_path / "o.txt")], "--out"),
        (gen[:3] + ["--slow", str(fast), "--fast", str(slow), "--prompt", "x"], "--slow: p_fast.safetensors is a fast"),
        (gen[:3] + ["--slow", str(slow), "--fast", str(slow), "--prompt", "x"], "--fast: p_slow.safetensors is a slow"),
        (["schedule", "--family", "explicit", "--sigmas", "1,0.5,x"], "--sigmas '1,0.5,x'"),
        (["schedule", "--family", "flux", "--width", "16384", "--height", "16384"], "works up to about"),
        (["inspect", str(tmp_path / "none.safetensors")], "file not found"),
    ]
    import glance_core.cli as cli

    def no_load(args):
        raise AssertionError("the pipeline was loaded before every flag was checked")
    monkeypatch.setattr(cli, "_load_pipeline", no_load)
    for args, msg in cases:
        code, err = _main(capsys, *args)
        assert code == 2 and msg in err and err.startswith("error: "), (args, err[-2000:])
    monkeypatch.undo()
    out = _cli(*cases[0][0])  # as a process too: one line, no traceback
    assert out.returncode == 2 and out.stderr.startswith("error: --steps 0") and "Traceback" not in out.stderr


def test_diffusers_load_pair_refuses_swapped_files_before_touching_the_pipeline(tmp_path):
    from glance_core import diffusers_glance

    class Untouchable:  # any attribute read would mean the pipeline was used before the check
        def __getattr__(self, name):
            raise AssertionError(f"pipeline.{name} read before the pair was checked")

    class Pipe:
        transformer = property(lambda self: Untouchable())

    slow = _glance_file(tmp_path, "s.safetensors", "slow")
    fast = _glance_file(tmp_path, "f.safetensors", "fast")
    with pytest.raises(GlanceError, match=r"^slow: f.safetensors is a fast LoRA"):
        diffusers_glance.load_pair(Pipe(), fast, slow)
