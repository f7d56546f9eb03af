import math

import pytest
import torch

from glance_core import runtime
from glance_core.train import TrainConfig, TrainingError, flow_matching_loss, lora_pair_params, train_lora


def test_loss_is_zero_for_the_true_velocity():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.3, 0.9])
    assert flow_matching_loss(lambda xt, s: noise - x0, x0, noise, sigma).item() == 0.0
    # and it is the mean squared error against noise - x0 otherwise
    got = flow_matching_loss(lambda xt, s: torch.zeros_like(xt), x0, noise, sigma).item()
    assert math.isclose(got, ((noise - x0) ** 2).mean().item(), rel_tol=1e-6)


def test_velocity_sees_x_at_sigma():
    x0, noise = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    seen = []
    flow_matching_loss(lambda xt, s: (seen.append((xt.clone(), s)), xt)[1], x0, noise, torch.tensor([0.25]))
    assert torch.allclose(seen[0][0], torch.full((1, 1, 2, 2), 0.25))


def test_lora_params_start_at_the_base_model():
    for rank in (4, 32):  # std 1/rank: 0.25 and 0.031 (a missing /rank would give 1.0 for both)
        down, up = lora_pair_params((rank, 4096), (8, rank), rank, generator=torch.Generator().manual_seed(0))
        assert down.requires_grad and up.requires_grad and up.abs().sum() == 0
        assert down.std().item() == pytest.approx(1 / rank, rel=0.02)


def _toy(rank=2):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8, bias=False)
    lin.weight.requires_grad_(False)
    ad = runtime.Adapter("slow", trainable=True)
    down, up = lora_pair_params((rank, 8), (8, rank), rank, generator=torch.Generator().manual_seed(1))
    ad.add(lin, down, up, 1.0)
    return lin, ad


def test_train_lora_lowers_the_loss_at_its_sigmas():
    # x0 = 0 at sigma 0.5: the exact velocity is xt / 0.5, which a full-rank LoRA on the linear layer can learn.
    lin, ad = _toy(rank=8)
    x0 = torch.zeros(16, 8)

    def velocity(xt, s, dropped):
        with runtime.active(ad):
            return lin(xt)
    steps = []
    losses = train_lora(velocity, ad.parameters(), x0, [0.5], TrainConfig(steps=300, lr=3e-2),
                        on_step=lambda i, loss: steps.append(i))
    assert steps == list(range(300)) and len(losses) == 300
    assert sum(losses[-10:]) < 0.1 * sum(losses[:10])


def test_bad_runs_are_refused():
    lin, ad = _toy()
    x0 = torch.randn(4, 8)
    with pytest.raises(TrainingError, match="fast: no sigmas to train at"):
        train_lora(lambda xt, s, d: lin(xt), ad.parameters(), x0, [], TrainConfig(steps=3), phase="fast")
    with pytest.raises(TrainingError, match="slow: the loss became inf at step 1 of 3"):
        train_lora(lambda xt, s, d: lin(xt) * float("inf"), ad.parameters(), x0, [0.5], TrainConfig(steps=3),
                   phase="slow")


def test_caption_dropout_share():
    lin, ad = _toy()
    drops = []

    def velocity(xt, s, dropped):
        drops.append(dropped)
        with runtime.active(ad):
            return lin(xt)
    train_lora(velocity, ad.parameters(), torch.randn(2, 8), [0.5], TrainConfig(steps=400, caption_dropout=0.1))
    assert 0.05 < sum(drops) / len(drops) < 0.15


def test_a_caller_supplied_loss_replaces_flow_matching():
    # A caller's loss regressing fixed (x_sigma, velocity) per drawn sigma (as the teacher's trajectory): a linear LoRA learns
    # to map two fixed inputs to their two fixed outputs, which fresh-noise flow matching could never give.
    lin, ad = _toy(rank=8)
    xs = [torch.randn(1, 8, generator=torch.Generator().manual_seed(k)) for k in (5, 6)]
    vs = [torch.randn(1, 8, generator=torch.Generator().manual_seed(k)) for k in (7, 8)]
    seen = []

    def velocity(xt, s, dropped):
        seen.append((xt, float(s)))
        with runtime.active(ad):
            return lin(xt)
    def loss(model, x0, noise, sigma, k):
        return torch.nn.functional.mse_loss(model(xs[k], sigma), vs[k])
    losses = train_lora(velocity, ad.parameters(), torch.zeros(1, 8), [0.9, 0.3], TrainConfig(steps=400, lr=3e-2),
                        loss=loss)
    assert losses[-1] < 1e-3 * losses[0]
    for xt, s in seen:  # each sigma got its own input
        assert xt is xs[0 if s == pytest.approx(0.9) else 1]
    with runtime.active(ad):
        assert torch.allclose(lin(xs[1]), vs[1], atol=0.05)
    with pytest.raises(TrainingError, match="no sigmas"):
        train_lora(velocity, ad.parameters(), torch.zeros(1, 8), [], TrainConfig(steps=1), loss=loss)


def test_cosine_decay_steps_the_lr_down_to_zero_and_only_when_asked():
    """Each step moves a lone parameter by exactly lr (Adam normalises a steady gradient to about 1), so the
    per-step moves read back the lr schedule: constant by default, cosine from lr to 0 when asked."""
    def run(decay):
        w = torch.zeros(1, requires_grad=True)
        seen = []

        def loss(model, x0, noise, sigma, k):
            seen.append(w.detach().clone())
            return (w - 100.0).pow(2).sum()
        settings = TrainConfig(steps=5, lr=0.1, grad_clip=0, lr_decay=decay)
        train_lora(lambda xt, s, d: xt, [w], torch.zeros(1), [0.5], settings, loss=loss)
        seen.append(w.detach().clone())
        return [(b - a).item() for a, b in zip(seen, seen[1:])]
    constant, cosine = run("constant"), run("cosine")
    assert constant == pytest.approx([0.1] * 5, rel=1e-3)
    want = [0.1 * 0.5 * (1 + math.cos(math.pi * i / 5)) for i in range(5)]
    assert cosine == pytest.approx(want, rel=1e-3) and cosine[-1] < 0.011
    with pytest.raises(TrainingError, match="lr_decay 'linear'"):
        run("linear")
    from glance_core import distill
    assert distill.lr_decay(distill.DISTILL) == "cosine" and distill.lr_decay(distill.FLOW) == "constant"
