import torch

from glance_core import runtime


def _lin(i=8, o=12, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(i, o)


def test_branch_only_while_active():
    lin = _lin()
    down, up = torch.randn(3, 8), torch.randn(12, 3)
    ad = runtime.Adapter("slow")
    ad.add(lin, down, up, 0.5)
    x = torch.randn(2, 5, 8)
    base = lin(x)
    with torch.no_grad():
        with runtime.active(ad):
            got = lin(x)
        after = lin(x)
    torch.testing.assert_close(got, base + 0.5 * x @ (up @ down).t())
    torch.testing.assert_close(after, base)  # inactive: untouched
    assert ad.applied == 1


def test_fused_slices_and_two_adapters():
    lin = _lin(8, 24)
    g = torch.Generator().manual_seed(1)
    parts = [(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
    a, b = runtime.Adapter("a"), runtime.Adapter("b")
    for k, (d, u) in enumerate(parts):
        a.add(lin, d, u, 2.0, offset=8 * k, length=8)
    extra_d, extra_u = torch.randn(4, 8, generator=g), torch.randn(24, 4, generator=g)
    b.add(lin, extra_d, extra_u, 1.0)
    x = torch.randn(3, 8, generator=g)
    want = lin(x).detach() + x @ (extra_u @ extra_d).t()
    for k, (d, u) in enumerate(parts):
        want[:, 8 * k:8 * k + 8] += 2.0 * x @ (u @ d).t()
    with torch.inference_mode(), runtime.active(a, b):
        got = lin(x)
    torch.testing.assert_close(got, want)


def test_gradients_flow_through_the_branch():
    lin = _lin()
    down = torch.randn(3, 8, requires_grad=True)
    up = torch.randn(12, 3, requires_grad=True)
    ad = runtime.Adapter("t")
    ad.add(lin, down, up, 1.0)
    with runtime.active(ad):
        lin(torch.randn(4, 8)).sum().backward()
    assert up.grad is not None and up.grad.abs().sum() > 0


def test_a_run_never_changes_what_the_pair_stores():
    lin = _lin().to(torch.float64)
    ad = runtime.Adapter("s")
    down, up = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(12, 3, dtype=torch.bfloat16)
    keep = (down.clone(), up.clone())
    ad.add(lin, down, up, 0.5)
    x = torch.randn(2, 8, dtype=torch.float64)
    with torch.no_grad(), runtime.active(ad, device=x.device, dtype=torch.float64):
        got = lin(x)
    b = ad.branches[lin][0]
    assert isinstance(b, runtime.Branch) and b.scale == 0.5 and b.offset == 0 and b.length is None
    # The stored tensors are the very objects added, in their dtype, with their values.
    assert b.down is down and b.up is up and down.dtype == up.dtype == torch.bfloat16
    assert torch.equal(down, keep[0]) and torch.equal(up, keep[1])
    torch.testing.assert_close(got, lin(x).detach() + 0.5 * x @ (up.double() @ down.double()).t())
    # The cached device copy is a separate tensor in the compute dtype.
    prepared = ad._prepared[1][lin]
    assert isinstance(prepared, runtime.Prepared) and prepared.down.dtype == torch.float64
    assert prepared.down.data_ptr() != down.data_ptr()


def test_class_swapped_only_inside_the_block():
    lin = _lin()
    ad = runtime.Adapter("s")
    ad.add(lin, torch.randn(3, 8), torch.randn(12, 3), 1.0)
    other = _lin(seed=3)  # a module without branches stays as it is, even inside the block
    assert type(lin) is torch.nn.Linear and not hasattr(lin, "_glance_slot")  # adding installs nothing
    with runtime.active(ad):
        assert type(lin) is not torch.nn.Linear and isinstance(lin, torch.nn.Linear)
        assert type(other) is torch.nn.Linear
        with runtime.active(replace=True):  # nested "nothing active" unbinds it for the inner block
            assert type(lin) is torch.nn.Linear
        assert type(lin) is not torch.nn.Linear
    assert type(lin) is torch.nn.Linear and not hasattr(lin, "_glance_slot")
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
