"""The training plan shared by the node and the diffusers side: checks before training, seeds, all-or-nothing writes."""
import builtins
import errno
import os

import pytest
import torch

from glance_core import plan
from glance_core.errors import GlanceError
from glance_core.families import get_family
from glance_core.lora import read_lora
from glance_core.schedule import build_schedule

FLUX = get_family("flux")


def _pair(tmp_path, name="p", overwrite=False, export=False, scale=1.0):
    out = plan.PairOutput(tmp_path, name, ("slow", "fast"), overwrite, export).check()
    rec = plan.resolve_recipe(FLUX, rank=2)
    sched = build_schedule(FLUX, 256, 256)
    mods = {ph: {"transformer_blocks.0.attn.to_q": (torch.full((2, 4), scale), torch.full((4, 2), scale), 8.0)}
            for ph in out.phases}
    metas = {ph: plan.pair_meta(ph, FLUX.name, sched, rec, ["transformer_blocks.0.attn.to_q"], "0" * 64, [1.0],
                                {}) for ph in out.phases}
    return out, mods, metas


def _bytes(paths):
    return {p: open(p, "rb").read() for p in paths}


def test_phase_seeds_near_2_64_wrap_instead_of_overflowing():
    top = 2 ** 64 - 1
    seeds = [plan.phase_seed(top, k) for k in (0, 1)]
    assert seeds == [999, 1999]
    for s in seeds + [plan.init_seed(top, 1)]:
        torch.Generator().manual_seed(s)  # would raise for a seed >= 2^64
    assert plan.phase_seed(5, 0) == 1005 and plan.init_seed(5, 1) == 6  # small seeds: the numbers as before
    with pytest.raises(GlanceError, match="seed: 18446744073709551616"):
        plan.check_seed(2 ** 64)


@pytest.mark.parametrize("kw,message", [
    (dict(alpha=float("nan")), "alpha: nan is not a finite number"),
    (dict(alpha=float("inf")), "alpha: inf is not a finite number"),
    (dict(lr=float("nan")), "learning_rate: nan is not a finite number"),
    (dict(caption_dropout=float("nan")), "caption_dropout: nan"),
    (dict(rank=513), "rank: 513 is out of range"),
    (dict(alpha=-1.0), "alpha: -1.0 must be positive"),
])
def test_bad_settings_are_named_before_training(kw, message):
    with pytest.raises(GlanceError, match=message):
        plan.resolve_recipe(FLUX, **kw)


def test_recipe_defaults_come_from_the_family():
    r = plan.resolve_recipe(get_family("qwen"))
    assert (r.rank, r.alpha, r.lr, r.caption_dropout) == (32, 128.0, 3e-4, 0.1)
    r = plan.resolve_recipe(FLUX, rank=4, caption_dropout=-1)
    assert (r.rank, r.alpha, r.caption_dropout) == (4, 16.0, 0.0)


def test_nan_pixels_are_named_not_blamed_on_the_learning_rate():
    img = torch.rand(1, 64, 64, 3)
    img[0, 3, 4, 1] = float("nan")
    with pytest.raises(GlanceError, match="image: 1 NaN or infinite") as e:
        plan.check_finite(img, "image")
    assert "not the learning rate" in str(e.value)
    plan.check_finite(torch.rand(3), "fine")


@pytest.mark.parametrize("name,message", [
    ("a\x00b", "NUL"), ("a/b", "plain file name"), ("", "empty"), (" x", "plain file name"),
    ("x" * 230, "too long for this file system"),
])
def test_bad_names_are_refused_before_training(tmp_path, name, message):
    with pytest.raises(GlanceError, match=message):
        plan.PairOutput(tmp_path, name, ("slow", "fast")).check()
    assert not list(tmp_path.iterdir())


def test_the_longest_name_that_fits_is_accepted_and_written(tmp_path):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    longest = limit - plan.PairOutput.TEMP_EXTRA - len("_slow_diffusers.safetensors")
    out, mods, metas = _pair(tmp_path, "n" * longest, export=True)
    written = out.write(mods, metas, "diffusers")
    assert len(written) == 4 and all(os.path.exists(p) for p in written)
    with pytest.raises(GlanceError, match="too long"):
        plan.PairOutput(tmp_path, "n" * (longest + 1), ("slow",), export_diffusers=True).check()


def test_folder_that_is_a_file_is_named(tmp_path):
    (tmp_path / "glance").write_text("x")
    with pytest.raises(GlanceError, match="is a file, not a folder"):
        plan.PairOutput(tmp_path / "glance", "p", ("slow",), folder_name="loras/glance").check()


@pytest.mark.parametrize("err, text", [(errno.EACCES, "loras/glance: cannot write into .*permission denied"),
                                       (errno.EROFS, "read-only file system")])
def test_unwritable_folder_is_found_by_the_probe(tmp_path, monkeypatch, err, text):
    # A read-only or permission-less folder: the probe write fails (simulated: root ignores permission bits).
    real_open = builtins.open

    def deny(path, *a, **k):
        if ".probe" in os.fspath(path):
            raise OSError(err, os.strerror(err), path)
        return real_open(path, *a, **k)
    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(GlanceError, match=text):
        plan.PairOutput(tmp_path, "p", ("slow",), folder_name="loras/glance").check()
    monkeypatch.undo()
    assert not list(tmp_path.iterdir())  # the probe left nothing


def test_existing_export_files_are_refused_before_training(tmp_path):
    (tmp_path / "p_fast_diffusers.safetensors").write_bytes(b"old")
    plan.PairOutput(tmp_path, "p", ("slow", "fast")).check()  # no export asked: fine
    with pytest.raises(GlanceError, match="p_fast_diffusers.safetensors exists"):
        plan.PairOutput(tmp_path, "p", ("slow", "fast"), export_diffusers=True).check()


@pytest.mark.parametrize("fail_at", ["stage", "publish"])
def test_overwrite_is_all_or_nothing(tmp_path, monkeypatch, fail_at):
    out, mods, metas = _pair(tmp_path, export=True)
    old = _bytes(out.write(mods, metas, "diffusers"))
    out, mods, metas = _pair(tmp_path, overwrite=True, export=True, scale=2.0)
    calls = {"n": 0}
    if fail_at == "stage":  # the third file's write fails (disk full) after two new files are complete
        real = plan.stage

        def stage(path, write):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device", path)
            return real(path, write)
        monkeypatch.setattr(plan, "stage", stage)
        err = OSError
    else:  # an interrupt while the finished files are moved into place
        import glance_core.files as files
        real = os.replace

        def replace(src, dst):
            if src.endswith(".part"):
                calls["n"] += 1
                if calls["n"] == 3:
                    raise KeyboardInterrupt
            return real(src, dst)
        monkeypatch.setattr(files.os, "replace", replace)
        err = KeyboardInterrupt
    with pytest.raises(err):
        out.write(mods, metas, "diffusers")
    monkeypatch.undo()
    assert _bytes(old) == old  # every old file exactly as it was
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in old)  # no temporaries left
    # and a write that succeeds replaces every file
    new = out.write(mods, metas, "diffusers")
    assert all(_bytes([p])[p] != old[p] for p in new)
    assert read_lora(out.paths["slow"]).modules["transformer_blocks.0.attn.to_q"].down[0, 0] == 2.0
