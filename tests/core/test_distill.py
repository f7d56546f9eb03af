"""The distillation objective (glance_core.distill): base paths, the loss, and training on a tiny pipeline."""
import pytest
import torch

from glance_core import distill
from glance_core.errors import GlanceError
from glance_core.families import get_family
from glance_core.lora import read_lora
from glance_core.schedule import build_schedule


def _euler(v, x, grid):
    for a, b in zip(grid, grid[1:]):
        x = x + (b - a) * v(x, torch.full((x.shape[0],), a))
    return x


def test_path_states_are_the_euler_path_at_grid_and_between():
    torch.manual_seed(0)
    w = torch.randn(4, 4)
    v = lambda x, s: x @ w * s.reshape(-1, 1)  # noqa: E731 (depends on x and sigma: no shortcut is exact)
    noise = torch.randn(2, 4)
    grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    got = distill.path_states(v, noise, grid[:-1], [1.0, 0.5, 0.4, 0.0])
    torch.testing.assert_close(got[0], noise)
    torch.testing.assert_close(got[1], _euler(v, noise, grid[:3]))
    mid = _euler(v, noise, grid[:3])  # 0.4 lies on the straight Euler step from 0.5 to 0.25
    torch.testing.assert_close(got[2], mid + (0.4 - 0.5) * v(mid, torch.full((2,), 0.5)))
    torch.testing.assert_close(got[3], _euler(v, noise, grid))
    with pytest.raises(GlanceError, match="outside"):
        distill.path_states(v, noise, [0.8, 0.4], [0.9])


def test_guided_velocity_and_seeds():
    vel = lambda x, s, dropped: x * 0 + (0.0 if dropped else 1.0)  # noqa: E731
    x = torch.zeros(1, 2)
    assert distill.guided(vel, 3.0)(x, torch.ones(1)).tolist() == [[3.0, 3.0]]
    assert distill.guided(vel, 1.0)(x, torch.ones(1)).tolist() == [[1.0, 1.0]]
    assert distill.trajectory_seeds(2 ** 64 - 1, 2) == [2 ** 64 - 1, 0]
    # the first trajectory uses the noise ComfyUI's prepare_noise gives for the seed
    torch.testing.assert_close(distill.seed_noise((1, 4, 8, 8), 7),
                               torch.randn((1, 4, 8, 8), generator=torch.manual_seed(7)))


@pytest.mark.parametrize("kw, message", [
    (dict(objective="distill"), "objective: 'distill'"),
    (dict(trajectories=0), "trajectories: 0"),
    (dict(cfg=float("nan")), "distill_cfg: nan"),
    (dict(cfg=0.5), "distill_cfg: 0.5"),
    (dict(student_cfg=float("inf")), "student_cfg: inf"),
    (dict(prompts="both"), "trajectory_prompts: 'both'"),
])
def test_bad_settings_are_named(kw, message):
    args = dict(objective=distill.DISTILL, trajectories=4, cfg=3.0, student_cfg=None, names=None,
                prompts=distill.CAPTION)
    args.update(kw)
    with pytest.raises(GlanceError, match=message):
        distill.check_settings(*args.values())


def test_mixed_paths_are_made_and_regressed_on_the_empty_prompt():
    """MIX: every second path follows the unconditional velocity, and its training items predict it (no guidance)."""
    grid = [1.0, 0.5, 0.0]
    steps = build_schedule("flux", 256, 256).steps
    calls = []

    def vel(x, s, dropped):
        calls.append(dropped)
        return x * 0 + (1.0 if dropped else 2.0)
    paths = distill.make_trajectories(vel, (1, 2), [0, 1, 2], grid, steps, 3.0, prompts=distill.MIX)
    assert paths["empty"] == [False, True, False]
    st, end = paths["states"], paths["sigmas"].index(0.0)
    noise = [distill.seed_noise((1, 2), s) for s in (0, 1, 2)]
    # guided on the caption: 1 + 3 (2 - 1) = 4 per unit sigma; on the empty prompt: 1
    for n, speed in ((0, 4.0), (1, 1.0), (2, 4.0)):
        torch.testing.assert_close(st[end, n:n + 1], noise[n] - speed)
    loss = distill.distill_loss(paths, steps, "fast", vel, 3.0, seed=0)
    seen = set()
    for _ in range(40):
        calls.clear()
        value = loss(None, torch.zeros(1, 2), None, None, 0)
        assert value.item() < 1e-10  # each item regresses its own path's velocity: exact here
        seen.add(tuple(calls))
    assert seen == {(False, True), (True,)}  # guided on caption paths, unconditional on the empty ones
    assert distill.empty_flags(3) == [False, False, False]
    assert distill.meta(distill.DISTILL, [0, 1], 3.0, 3.0, 50, distill.MIX)["trajectory_prompts"] == distill.MIX


def test_layer_choices_name_the_timestep_embedder_of_each_family():
    import tiny_pipelines
    from glance_core.families import LAYERS, TIMESTEP_LAYERS
    flux = tiny_pipelines.tiny_flux_transformer()
    names = [n for n, m in flux.named_modules() if isinstance(m, torch.nn.Linear)
             and get_family("flux").layer_pattern(TIMESTEP_LAYERS).search(n)]
    assert names == ["time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2"]
    assert get_family("qwen-image").layer_pattern(LAYERS[0]) is get_family("qwen-image").target_pattern
    with pytest.raises(GlanceError, match="layers: 'all' is not one of"):
        get_family("sd3").layer_pattern("all")
    with pytest.raises(GlanceError, match="--layers: the Explicit sigmas family names no timestep embedder"):
        get_family("explicit").layer_pattern(TIMESTEP_LAYERS, name="--layers")


def test_loss_trains_a_linear_student_onto_the_path():
    torch.manual_seed(0)
    sched = build_schedule("flux", 256, 256)
    base = torch.nn.Linear(4, 4)
    base.requires_grad_(False)
    delta = torch.zeros(4, 4, requires_grad=True)

    def velocity(x, s, dropped, lora=True):
        h = base(x * s.reshape(-1, 1)) + x
        return h + (x @ delta if lora else 0) - (0.5 if dropped else 0.0)

    base_sigmas = get_family("flux").base_sigmas(50, 256, 256)
    paths = distill.make_trajectories(lambda x, s, d: velocity(x, s, d, lora=False), (1, 4), [0, 1, 2],
                                      base_sigmas, sched.steps, 2.0)
    assert paths["states"].shape == (11, 3, 4) and paths["sigmas"][0] == 1.0 and paths["sigmas"][-1] == 0.0
    loss = distill.distill_loss(paths, sched.steps, "fast", velocity, 2.0)
    from glance_core.train import TrainConfig, train_lora

    def landing_error():  # every (trajectory, fast step): distance of the 10-step landing point to the path
        sig, st = paths["sigmas"], paths["states"]
        v = distill.guided(velocity, 2.0)
        with torch.no_grad():
            return sum(((st[sig.index(s.sigma_from)] + (s.sigma_to - s.sigma_from) * v(
                st[sig.index(s.sigma_from)], torch.full((3,), s.sigma)) - st[sig.index(s.sigma_to)]) ** 2).sum().item()
                for s in sched.steps if s.phase == "fast")

    before = landing_error()
    cfg = TrainConfig(steps=200, lr=1e-2, seed=0)
    losses = train_lora(velocity, [delta], torch.zeros(1, 4), sched.phase_sigmas("fast"), cfg, loss=loss)
    assert len(losses) == 200 and before > 0
    assert landing_error() < 0.5 * before


def _glance_end(pipe, velocity, noise, sched, cfg, adapters):
    """x at sigma 0 after the 10 Glance Euler steps (with the pair's adapters per phase, or none)."""
    from glance_core.diffusers_glance import ADAPTERS
    t = pipe.transformer
    x = noise
    with torch.no_grad():
        for st in sched.steps:
            if adapters:
                t.enable_adapters()
                t.set_adapters([ADAPTERS[st.phase]])
            else:
                t.disable_adapters()
            v = distill.guided(velocity, cfg)(x, torch.full((1,), st.sigma))
            x = x + (st.sigma_to - st.sigma_from) * v
    t.enable_adapters()
    return x


@pytest.mark.parametrize("layers, prompts, lr", [("recipe (paper)", distill.CAPTION, 5e-3),
                                                ("timestep embedder", distill.MIX, 2e-3)])
def test_diffusers_distilled_pair_lands_nearer_the_50_step_picture(tmp_path, layers, prompts, lr):
    from test_diffusers_glance import SIZE, _embeds, _qwen_pipe
    from glance_core.diffusers_train import train_pair
    from glance_core.families import get_family
    pipe = _qwen_pipe()
    pe, pm = _embeds(1)
    ee, em = _embeds(3)
    seen = []
    paths = train_pair(pipe, image_latents=torch.zeros(1, 16, 1, SIZE // 8, SIZE // 8), prompt_embeds=pe,
                       prompt_embeds_mask=pm, empty_prompt_embeds=ee, empty_prompt_embeds_mask=em, steps=60, rank=4,
                       learning_rate=lr, out_dir=tmp_path, name="dist", seed=5, objective=distill.DISTILL,
                       trajectories=3, distill_cfg=2.0, on_trajectory=lambda i, n: seen.append((i, n)),
                       layers=layers, trajectory_prompts=prompts)
    fam = get_family("qwen-image")
    sched = build_schedule(fam, SIZE, SIZE)
    assert seen[-1] == (3 * sched.base_steps, 3 * sched.base_steps) and len(seen) == 3 * sched.base_steps
    for phase, path in paths.items():
        g = read_lora(path).glance
        assert g.extra["layers"] == layers and g.extra["trajectory_prompts"] == prompts
        timestep = [t for t in g.target_modules if "timestep_embedder" in t]
        if layers == "timestep embedder":
            assert g.target_modules == timestep and len(timestep) == 2
        else:
            assert not timestep and len(g.target_modules) > 2
        assert g.extra["objective"] == distill.DISTILL and g.extra["trajectories"] == 3
        assert g.extra["trajectory_seeds"] == ["5", "6", "7"] and g.extra["distill_cfg"] == 2.0
        assert g.extra["student_cfg"] == 2.0 and g.extra["distill_base_steps"] == 50
        assert sum(g.extra["losses"][-10:]) < sum(g.extra["losses"][:10])
    call = fam.train_call(pipe, SIZE, SIZE, "cpu", torch.float32)
    conds = {False: (pe, pm), True: (ee, em)}
    velocity = lambda x, s, dropped: call(x, s, conds[dropped])  # noqa: E731
    base = fam.base_sigmas(sched.base_steps, SIZE, SIZE)
    for seed in (5, 100):  # a training trajectory's seed, and one never trained on
        noise = distill.seed_noise((1, (SIZE // 16) ** 2, 64), seed)
        pipe.transformer.disable_adapters()
        ref = distill.path_states(distill.guided(velocity, 2.0), noise, base, [0.0])[0]
        pipe.transformer.enable_adapters()
        bare = _glance_end(pipe, velocity, noise, sched, 2.0, adapters=False)
        ours = _glance_end(pipe, velocity, noise, sched, 2.0, adapters=True)
        assert ((ours - ref) ** 2).mean() < ((bare - ref) ** 2).mean(), seed


def test_diffusers_distill_needs_the_empty_prompt_for_guidance():
    from test_diffusers_glance import SIZE, _embeds, _qwen_pipe
    from glance_core.diffusers_train import train_pair
    pe, pm = _embeds(1)
    with pytest.raises(GlanceError, match="empty_prompt_embeds"):
        train_pair(_qwen_pipe(), image_latents=torch.zeros(1, 16, 1, SIZE // 8, SIZE // 8), prompt_embeds=pe,
                   prompt_embeds_mask=pm, steps=1, objective=distill.DISTILL, distill_cfg=3.0)
    with pytest.raises(GlanceError, match="trajectories: 0"):
        train_pair(_qwen_pipe(), image_latents=torch.zeros(1, 16, 1, SIZE // 8, SIZE // 8), prompt_embeds=pe,
                   prompt_embeds_mask=pm, steps=1, objective=distill.DISTILL, trajectories=0)


def test_cli_trains_a_distilled_pair_and_names_bad_flags(tmp_path, capsys):
    import tiny_pipelines
    from PIL import Image
    from test_cli_diffusers import _cli
    from glance_core.cli import main
    flux_dir = tiny_pipelines.save_tiny_flux(str(tmp_path / "tiny_flux"))
    Image.new("RGB", (256, 256), (200, 60, 40)).save(tmp_path / "ref.png")
    common = ["train", "--model", flux_dir, "--image", str(tmp_path / "ref.png"), "--caption", "a red fox",
              "--steps", "2", "--rank", "4", "--resolution", "256", "--out-dir", str(tmp_path)]
    out = _cli(*common, "--name", "d", "--objective", "distill", "--trajectories", "2", "--distill-cfg", "2",
               "--student-cfg", "1", "--seed", "9", "--layers", "timestep", "--trajectory-prompts", "mix")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Base-model paths" in out.stderr and "Glance training" in out.stderr
    for phase in ("slow", "fast"):
        g = read_lora(str(tmp_path / f"d_{phase}.safetensors")).glance
        assert g.extra["objective"] == distill.DISTILL and g.extra["trajectory_seeds"] == ["9", "10"]
        assert g.extra["distill_cfg"] == 2.0 and g.extra["student_cfg"] == 1.0
        assert g.extra["trajectory_prompts"] == distill.MIX and g.extra["layers"] == "timestep embedder"
        assert sorted(g.target_modules) == ["time_text_embed.timestep_embedder.linear_1",
                                            "time_text_embed.timestep_embedder.linear_2"]
    for flags, msg in [(["--objective", "best"], "--objective 'best': choose one of flow, distill"),
                       (["--objective", "distill", "--trajectories", "0"], "--trajectories: 0 is out of range"),
                       (["--objective", "distill", "--distill-cfg", "nan"], "--distill-cfg: nan"),
                       (["--objective", "distill", "--student-cfg", "-1"], "--student-cfg: -1"),
                       (["--layers", "attn"], "--layers 'attn': choose one of recipe, timestep"),
                       (["--trajectory-prompts", "x"], "--trajectory-prompts 'x': choose one of caption, mix")]:
        assert main([*common, "--name", "e", *flags]) == 2, flags  # checked before the pipeline loads
        err = capsys.readouterr().err
        assert msg in err, (flags, err)
    assert not list(tmp_path.glob("e_*"))
