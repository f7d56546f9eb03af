import pytest
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


def _spy_fused(monkeypatch):
    calls = []
    real = runtime._fused

    def spy(slot, module, x, weight, bias):
        calls.append(weight is module.weight)
        return real(slot, module, x, weight, bias)
    monkeypatch.setattr(runtime, "_fused", spy)
    return calls


def _reference(lin, x, *adapters):
    """float64 result of the layer with every branch added."""
    want = torch.nn.functional.linear(x.double(), lin.weight.double(),
                                      None if lin.bias is None else lin.bias.double())
    for ad in adapters:
        for b in ad.branches[lin]:
            n = b.length or lin.out_features
            want[..., b.offset:b.offset + n] += b.scale * x.double() @ (b.up.double() @ b.down.double()).t()
    return want


@pytest.mark.parametrize("tokens", [7, 40])  # 2 x 40 tokens: a weight copy takes the delta (4 x 16 x 24 < 80 x 40)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["whole", "slices", "two adapters"])
def test_branches_folded_into_the_product_match_separate_branches(monkeypatch, bias, kind, tokens):
    torch.manual_seed(3)
    lin = torch.nn.Linear(16, 24, bias=bias)
    a, b = runtime.Adapter("a"), runtime.Adapter("b")
    if kind == "slices":  # FLUX-like fused qkv: one branch per row range, the middle one left out
        a.add(lin, torch.randn(2, 16), torch.randn(8, 2), 2.0, offset=0, length=8)
        a.add(lin, torch.randn(3, 16), torch.randn(8, 3), 0.5, offset=16, length=8)
    else:
        a.add(lin, torch.randn(4, 16), torch.randn(24, 4), 0.7)
    if kind == "two adapters":
        b.add(lin, torch.randn(2, 16), torch.randn(8, 2), 1.5, offset=8, length=8)
    ads = (a, b) if kind == "two adapters" else (a,)
    x = torch.randn(2, tokens, 16)
    stored = lin.weight.detach().clone()
    calls = _spy_fused(monkeypatch)
    with torch.inference_mode(), runtime.active(*ads, device=x.device, dtype=x.dtype):
        fused = lin(x)
    assert calls == [True]  # folded, with the layer's own stored weight (beta=1 accumulation)
    monkeypatch.setattr(runtime, "fuse", False)
    with torch.inference_mode(), runtime.active(*ads, device=x.device, dtype=x.dtype):
        separate = lin(x)
    assert calls == [True]  # runtime.fuse = False: the separate branch
    want = _reference(lin, x, *ads)
    torch.testing.assert_close(fused.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(separate.double(), want, rtol=1e-5, atol=1e-5)
    assert fused.shape == (2, tokens, 24) and all(ad.applied == 2 for ad in ads)
    assert torch.equal(lin.weight, stored)  # the stored weight never takes the delta


class _HalfStored(torch.nn.Linear):
    """A layer storing fp16 weights and computing in the input's dtype, as ComfyUI's manual-cast fp8 layers do."""

    def forward(self, x):
        return torch.nn.functional.linear(x, *self.cast(x))

    def cast(self, x):
        return self.weight.to(x.dtype), self.bias.to(x.dtype)


runtime.plain_linear(lambda cls: issubclass(cls, _HalfStored), lambda m, x: m.cast(x))


@pytest.mark.parametrize("tokens,into_weight", [(64, True), (3, False)])
def test_a_cast_copy_takes_the_delta_never_the_stored_weight(monkeypatch, tokens, into_weight):
    torch.manual_seed(4)
    lin = _HalfStored(16, 24).half()
    stored = lin.weight.detach().clone()
    ad = runtime.Adapter("s")
    ad.add(lin, torch.randn(4, 16), torch.randn(24, 4), 0.7)
    x = torch.randn(tokens, 16)
    calls = _spy_fused(monkeypatch)
    with torch.inference_mode(), runtime.active(ad, device=x.device, dtype=x.dtype):
        got = lin(x)
        again = lin(x)
    # Many tokens: the delta goes into the cast copy (cheaper than the output); few: accumulated as above.
    assert calls == [False, False] and (tokens * (16 + 24) > 2 * 16 * 24) == into_weight
    torch.testing.assert_close(got.double(), _reference(lin, x, ad), rtol=1e-5, atol=1e-5)
    assert torch.equal(again, got) and torch.equal(lin.weight, stored) and lin.weight.dtype == torch.float16


def test_other_layers_and_training_keep_the_separate_branch(monkeypatch):
    class OwnForward(torch.nn.Linear):  # e.g. GGUF's dequantizing layer: unknown forward, never folded
        def forward(self, x):
            return super().forward(x) * 2

    torch.manual_seed(5)
    lin, own = torch.nn.Linear(8, 8), OwnForward(8, 8)
    ad = runtime.Adapter("s")
    for m in (lin, own):
        ad.add(m, torch.randn(2, 8), torch.randn(8, 2), 1.0)
    x = torch.randn(5, 8)
    calls = _spy_fused(monkeypatch)
    with torch.inference_mode(), runtime.active(ad, device=x.device, dtype=x.dtype):
        got = own(x)
    torch.testing.assert_close(got.double(), 2 * torch.nn.functional.linear(x.double(), own.weight.double(),
                                                                            own.bias.double())
                               + x.double() @ (ad.branches[own][0].up.double() @ ad.branches[own][0].down.double()).t(),
                               rtol=1e-5, atol=1e-5)
    with runtime.active(ad, device=x.device, dtype=x.dtype):  # grad enabled: autograd's separate branch
        lin(x).sum().backward()
    with torch.inference_mode(), runtime.active(ad, device=x.device, dtype=torch.float64):
        lin(x)  # the adapter's copies are float64, the layer computes in float32: not folded
    assert calls == [] and lin.weight.grad is not None


@pytest.mark.parametrize("cast,tokens,accumulated", [(False, 3, (6, 24)), (False, 40, (24, 16)),
                                                     (True, 40, (24, 16))])
def test_folded_branches_compile_in_place_without_breaks(monkeypatch, cast, tokens, accumulated):
    """fullgraph compile of a folded layer equals eager, and each accumulation (the base product onto the
    branch output, or the delta into a weight copy) stays one in-place op in the graph: a traced
    Tensor.addmm_ would become a copy and an out-of-place addmm, two extra passes."""
    from torch._dynamo.utils import counters
    torch.manual_seed(6)
    lin = (_HalfStored(16, 24).half() if cast else torch.nn.Linear(16, 24))
    ad = runtime.Adapter("s")
    ad.add(lin, torch.randn(4, 16), torch.randn(24, 4), 0.7)
    x = torch.randn(2, tokens, 16)
    seen = []
    real = runtime._ADDMM_
    monkeypatch.setattr(runtime, "_ADDMM_", lambda c, a, b: (seen.append(tuple(c.shape)), real(c, a, b))[1])
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(lambda t: lin(t) * 1.0, fullgraph=True, backend="inductor")
    with torch.inference_mode(), runtime.active(ad, device=x.device, dtype=x.dtype):
        got = step(x)
        eager = lin(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _reference(lin, x, ad), rtol=1e-5, atol=1e-5)
    assert sum(counters["graph_break"].values()) == 0
    assert seen == [accumulated]  # traced once, through the in-place op


def test_autocast_and_parametrized_weights_keep_the_separate_branch(monkeypatch):
    """Under autocast the products change dtype (the fold would mix them); a parametrized weight is computed on
    access, so there is no stored tensor to fold into (and its original must never take the delta)."""
    from torch.nn.utils import parametrize

    class Same(torch.nn.Module):
        def forward(self, w):
            return w

    torch.manual_seed(7)
    lin, par = torch.nn.Linear(16, 24), torch.nn.Linear(16, 24)
    parametrize.register_parametrization(par, "weight", Same())
    original = par.parametrizations.weight.original.detach().clone()
    ad = runtime.Adapter("s")
    for m in (lin, par):
        ad.add(m, torch.randn(4, 16), torch.randn(24, 4), 0.7)
    calls = _spy_fused(monkeypatch)
    for tokens in (3, 64):
        x = torch.randn(tokens, 16)
        with torch.inference_mode(), runtime.active(ad, device=x.device, dtype=x.dtype):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = lin(x)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.double(), _reference(lin, x, ad), rtol=2e-2, atol=1e-1)  # bf16
            torch.testing.assert_close(par(x).double(), _reference(par, x, ad), rtol=1e-5, atol=1e-5)
    assert calls == [] and torch.equal(par.parametrizations.weight.original, original)
