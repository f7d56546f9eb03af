"""The bundled teacher and everything built on it: data, judge, weights, pair training, demo, benchmark."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from glance_core import runtime
from glance_core.errors import GlanceError
from glance_core.schedule import build_schedule
from glance_shapes import DEFAULT_CFG, data, judge, teacher as teacher_mod
from glance_shapes.compare import VARIANTS, fidelity, render
from glance_shapes.glance import target_modules, train_pair
from glance_shapes.sampling import denoiser, glance_schedule, noise_for, plain_steps, sample, trajectory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def teacher():
    return teacher_mod.load()


def test_captions_parse_and_name_the_bad_word():
    cap = data.parse_caption("Red circle top-left on white")
    assert cap == data.Caption("circle", "red", "top-left", "white") and str(cap) == "red circle top-left on white"
    assert data.parse_caption("on white, top-left circle red") == cap
    assert len(data.all_captions()) == 4 * 6 * 5 * 3
    with pytest.raises(GlanceError, match="unknown word 'purple'"):
        data.parse_caption("purple circle top-left on white")
    with pytest.raises(GlanceError, match="lacks a position"):
        data.parse_caption("red circle on white")
    with pytest.raises(GlanceError, match="second colour 'blue'"):
        data.parse_caption("red blue circle top-left on white")


def test_the_judge_reads_every_generated_picture_right_and_notices_wrong_captions():
    gen = torch.Generator().manual_seed(3)
    caps = data.random_captions(300, gen)
    images = data.render(caps, gen)
    assert judge.score(images, caps)["all"] == 1.0
    # the same pictures against shifted captions: every attribute is caught being wrong
    others = [data.Caption(data.SHAPES[(data.SHAPES.index(c.shape) + 1) % 4], c.colour, c.position, c.background)
              for c in caps]
    assert judge.score(images, others)["shape"] == 0.0
    # noise alone has no shape
    assert judge.read(torch.full((1, 3, 32, 32), 0.5))[0].shape is None


def test_teacher_family_schedule_is_the_compressed_50_step_grid():
    sched = glance_schedule()
    assert sched.phase_sigmas("slow") == pytest.approx([1.0, 0.96, 0.92, 0.88, 0.84])
    assert sched.phase_sigmas("fast") == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.02])
    assert sched.steps[-1].sigma_to == 0.0 and len(plain_steps(10)) == 10
    assert [s.sigma for s in plain_steps(10)] == pytest.approx([1 - k / 10 for k in range(10)])
    # the same family object through the schedule engine's public entry (the engine's table does not list it)
    from glance_shapes.family import FAMILY
    assert build_schedule(FAMILY, 32, 32).sigmas == sched.sigmas


def test_teacher_weights_match_their_recorded_hash_and_size():
    rec = teacher_mod.read_record()
    assert os.path.getsize(teacher_mod.WEIGHTS) <= 20 * 1024 * 1024
    assert teacher_mod.sha256(teacher_mod.WEIGHTS) == rec["sha256"]
    assert rec["training"]["seed"] == 0 and rec["minutes"] <= 20


def test_a_changed_weights_file_is_refused(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    shutil.copy(teacher_mod.WEIGHTS, bad)
    with open(bad, "r+b") as f:
        f.seek(-5, os.SEEK_END)
        f.write(b"\x01\x02\x03\x04\x05")
    with pytest.raises(GlanceError, match="is not the recorded"):
        teacher_mod.load(str(bad))
    with pytest.raises(GlanceError, match="missing"):
        teacher_mod.load(str(tmp_path / "none.safetensors"))


def test_teacher_samples_fit_their_captions(teacher):
    gen = torch.Generator().manual_seed(11)
    caps = data.random_captions(24, gen)
    acc = judge.score(sample(teacher, caps, range(100, 124), plain_steps(50), cfg=DEFAULT_CFG), caps)
    assert acc["all"] >= 0.8, acc


def test_teacher_training_is_seeded_and_writes_a_matching_record(tmp_path):
    from glance_shapes import train_teacher
    settings = dict(train_teacher.DEFAULTS, steps=3, batch=4, warmup=2, threads=1)
    a, la = train_teacher.train(**settings, log=lambda *_: None)
    b, lb = train_teacher.train(**settings, log=lambda *_: None)
    assert la == lb and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    out = tmp_path / "t.safetensors"
    train_teacher.main(["--steps", "2", "--batch", "2", "--warmup", "1", "--threads", "1", "--out", str(out)])
    rec = json.loads((tmp_path / "teacher.json").read_text())
    assert rec["sha256"] == teacher_mod.sha256(out) and rec["training"]["steps"] == 2
    assert teacher_mod.load(str(out), str(tmp_path / "teacher.json")).config == teacher_mod.TeacherConfig()


def test_pair_switches_by_sigma_in_the_shared_integrator(teacher):
    pair, losses, _ = train_pair(teacher, data.parse_caption("red circle top-left on white"), 0, steps=2)
    assert set(losses) == {"slow", "fast"} and all(len(v) == 2 for v in losses.values())
    n = len(target_modules(teacher))
    assert n == 4 * 4  # q, k, v, out of each of the 4 blocks
    sched = glance_schedule()
    for a in pair.values():
        a.applied = 0
    sample(teacher, data.all_captions()[:2], [1, 2], sched.steps, pair, sched.boundary)
    assert pair["slow"].applied == 5 * n and pair["fast"].applied == 5 * n
    # nothing stays active outside a sampling call
    assert runtime.current() == ()


def test_trajectory_objective_pulls_the_pair_onto_the_teachers_path(teacher):
    cap = data.parse_caption("blue square centre on black")
    sched = glance_schedule()
    path = trajectory(teacher, cap, 5)
    target = (path[0.0] + 1) / 2
    bare = sample(teacher, [cap], [5], sched.steps)
    pair, losses, pic = train_pair(teacher, cap, 5, objective="trajectory", steps=150)
    assert torch.equal(pic, target.clamp(0, 1))
    tuned = sample(teacher, [cap], [5], sched.steps, pair, sched.boundary)
    # on its own training sample the 10-step result moves much closer to the 50-step one
    assert fidelity(tuned, target)[1] < 0.5 * fidelity(bare, target)[1]
    assert losses["fast"][-1] < losses["fast"][0]


def test_flow_matching_pair_changes_the_output_and_leaves_the_teacher_alone(teacher):
    cap = data.parse_caption("green cross bottom-right on gray")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    pair, _, _ = train_pair(teacher, cap, 1, steps=20)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    x, sigma = noise_for([9]), torch.tensor([0.6])
    cond = teacher.cond([cap])
    plain = denoiser(teacher, cond)(x, sigma)
    with_fast = denoiser(teacher, cond, {"fast": pair["fast"]}, boundary=0.82)(x, sigma)
    assert (plain - with_fast).abs().max() > 1e-4


def _demo(*args):
    return subprocess.run([sys.executable, "-m", "glance_shapes", "demo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_demo_runs_end_to_end_at_tiny_settings(tmp_path):
    out = tmp_path / "demo.png"
    r = _demo("--steps", "2", "--samples", "2", "--caption", "yellow triangle bottom-left on black", "--seed", "4",
              "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "teacher, 50 steps" in r.stdout and "Glance pair" in r.stdout and str(out) in r.stdout
    from PIL import Image
    img = Image.open(out)
    assert img.size[0] > 3 * 128 and img.size[1] > 2 * 128


@pytest.mark.parametrize("args, message", [
    (["--samples", "0"], "--samples 0"), (["--steps", "0"], "--steps 0"),
    (["--caption", "red blob top-left on white"], "unknown word 'blob'"),
    (["--out", "demo.jpg"], "give a .png path"), (["--out", "/no/such/dir/d.png"], "does not exist"),
    (["--seed", "-1"], "--seed -1"), (["--threads", "-2"], "--threads -2"), (["--cfg", "0.5"], "--cfg 0.5")])
def test_demo_names_bad_values(tmp_path, args, message):
    r = _demo(*args) if "--out" in args else _demo(*args, "--out", str(tmp_path / "d.png"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_benchmark_on_two_samples(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_shapes
    finally:
        sys.path.pop(0)
    res = bench_shapes.main(["--samples", "2", "--repeats", "1", "--steps", "2", "--distill-steps", "2",
                             "--trajectories", "2", "--out-dir", str(tmp_path)])
    rows = res["rows"]
    assert [r["label"] for r in rows] == [v.label for v in VARIANTS]
    assert res["cfg"] == DEFAULT_CFG != 1  # guided: two passes per step, counted as the paper does
    assert [r["calls"] for r in rows] == [100] + [20] * (len(VARIANTS) - 1)
    assert rows[0]["mse"] == 0 and all(r["mse"] > 0 for r in rows[1:])
    # Speed-up is the baseline's time over the row's (timing itself is for benchmarks, not tests).
    assert all(r["speedup"] == pytest.approx(rows[0]["seconds"] / r["seconds"]) for r in rows)
    for r in rows:  # 2 pictures: each accuracy is 0, 1/2 or 1, and all four right is never likelier than one
        acc = r["accuracy"]
        assert set(acc) == {"all", "shape", "colour", "position", "background"}
        assert all(2 * v == int(2 * v) for v in acc.values())
        assert acc["all"] <= min(v for k, v in acc.items() if k != "all"), acc
    # The adapter-free rows recomputed from their own pictures (the teacher is deterministic): each row's
    # accuracy is the judge's reading of that row's pictures against the held-out captions, not another row's.
    teacher = teacher_mod.load()
    captions = [data.parse_caption(c) for c, _ in res["held_out"]]
    seeds = [s for _, s in res["held_out"]]
    pictures = {v.label: render(teacher, v, captions, seeds, cfg=res["cfg"])[0] for v in VARIANTS if v.pair is None}
    assert len(pictures) == 3
    for r in rows:
        if r["label"] in pictures:
            assert r["accuracy"] == judge.score(pictures[r["label"]], captions), r["label"]
            assert r["mse"] == pytest.approx(fidelity(pictures[r["label"]], pictures[rows[0]["label"]])[1])
    assert res["caption"] not in [c for c, _ in res["held_out"]]
    for name in ("shapes_grid.png", "shapes_grid_all.png", "shapes_benchmark.md", "shapes_benchmark.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| teacher, 50 steps | 100 |" in (tmp_path / "shapes_benchmark.md").read_text()


def test_the_engine_does_not_know_the_teachers_family():
    from glance_core.errors import ScheduleError
    from glance_core.families import FAMILIES, comfyui_families, get_family
    assert "glance-shapes" not in FAMILIES and "qwen-image" in comfyui_families()
    with pytest.raises(ScheduleError, match="unknown model family"):
        get_family("shapes")
