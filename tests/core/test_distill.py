"""The distillation objective (glance_core.distill): base paths, the loss, and training on a tiny pipeline."""
import pytest
import torch

from glance_core import distill
from glance_core.errors import GlanceError
from glance_core.families import get_family
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
])
def test_bad_settings_are_named(kw, message):
    args = dict(objective=distill.DISTILL, trajectories=4, cfg=3.0, student_cfg=None)
    args.update(kw)
    with pytest.raises(GlanceError, match=message):
        distill.check_settings(*args.values())


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
