"""Run-time LoRA branches on torch modules, switched per model call without touching any weight.

While adapters are active (`active`), each module they adapt runs as a subclass of its own class whose
forward adds  scale * B(A x)  to its output (or to a slice of it, for fused layers such as FLUX's qkv);
when the block ends the module gets its own class back. So:
- modules outside a Glance call are untouched: clones of the model without a pair pay nothing;
- torch.compile guards on a module's class, so a graph traced without the branches is never reused with
  them (compile before or after attaching a pair, paired and unpaired clones of one model) and the
  branch code has no graph break (no context variable, no hook, no counter inside the traced code);
- the branch tensors sit on a per-module slot read as graph inputs: Slow and Fast swap tensors, not code,
  so a compiled graph is reused across steps, phases and generations without recompiling.
Nothing is merged into the stored weights, so they stay bit-exact, the branch is applied exactly in any
weight format (fp8 with manual cast, GGUF, layers ComfyUI offloads), and stock LoRAs merged into the weights
stack underneath. Where a layer's forward is a plain F.linear on weights in the compute dtype (its own, or
the copy its cast makes: see `plain_linear`), the branch is folded into that product instead of being added
to the output afterwards (`_fused`), which saves a pass over the output; other layers (GGUF) and training
keep the separate branch. The slots are per module, not per thread: one model call at a time per model.
"""
import contextlib
import contextvars
import logging
import os
from typing import NamedTuple, Optional

import torch

_ACTIVE = contextvars.ContextVar("glance_active_adapters", default=())
_SLOT = "_glance_slot"   # module attribute: tuple of (adapter, module, Prepared or None) while bound
_SUBCLASSES = {}         # original module class -> its branched subclass
_ORIGINAL = {}           # branched subclass -> original class
fuse = True  # fold branches into the layer's own product where its weights allow (False: always a separate branch)
log = logging.getLogger("glance")


class Branch(NamedTuple):
    """One stored branch: output[..., offset:offset+length] += scale * up @ down @ x (length None: whole)."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    offset: int = 0
    length: Optional[int] = None


class Piece(NamedTuple):
    """One branch on the compute device: rows r0:r1 of the shared down output times `up` (scale folded in)."""
    up: torch.Tensor
    r0: int
    r1: int
    offset: int
    length: int


class Prepared(NamedTuple):
    """A module's branches on one device and dtype: all downs stacked (one matmul), then one piece each."""
    down: torch.Tensor
    pieces: tuple


class Adapter:
    """One LoRA (for example the Slow one) as run-time branches, keyed by module object."""

    def __init__(self, name, trainable=False):
        self.name = name
        self.trainable = trainable  # parameters change every step: build device views each call, cache nothing
        self.branches = {}  # module -> list of Branch (never modified by running: what was loaded stays)
        self.applied = 0    # module applications so far in eager runs: how tests see that the adapter ran
        self._prepared = (None, None)  # ((device, dtype), {module: Prepared})

    def add(self, module, down, up, scale, offset=0, length=None):
        """Add a branch: output[..., offset:offset+length] += scale * up @ down @ x (length None: whole output)."""
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{self.name}: a run-time branch needs 2-D down/up of one rank, got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        self.branches.setdefault(module, []).append(Branch(down, up, float(scale), offset, length))
        self._prepared = (None, None)

    @property
    def nbytes(self):
        """Size of the stored down/up tensors in bytes."""
        return sum(t.numel() * t.element_size() for bs in self.branches.values() for b in bs for t in b[:2])

    def parameters(self):
        """The down/up tensors of every branch (what an optimizer trains)."""
        return [t for bs in self.branches.values() for b in bs for t in b[:2]]

    def freeze(self, storage="cpu"):
        """End training: keep detached copies on `storage`; the adapter becomes a plain (cached) inference one."""
        for bs in self.branches.values():
            bs[:] = [b._replace(down=b.down.detach().to(storage).requires_grad_(False),
                                up=b.up.detach().to(storage).requires_grad_(False)) for b in bs]
        self.trainable = False
        self._prepared = (None, None)

    def _for(self, device, dtype):
        """{module: Prepared} on device/dtype, cached for one device/dtype at a time (no growth)."""
        key, prepared = self._prepared
        if key != (device, dtype):
            # Copies: the stored tensors are never converted in place (a bf16 run must not change the pair).
            prepared = {m: _prepare(bs, device, dtype) for m, bs in self.branches.items()}
            self._prepared = ((device, dtype), prepared)
        return prepared

    def release(self):
        """Drop the device copies (they are rebuilt on the next call)."""
        self._prepared = (None, None)


def _prepare(branches, device, dtype):
    """Prepared form of one module's branches on a device and dtype (differentiable for trainable ones)."""
    downs, pieces, r0 = [], [], 0
    wide = torch.promote_types(dtype, torch.float32)  # fold the scale in before rounding to `dtype`
    for b in branches:
        r = b.down.shape[0]
        downs.append(b.down.to(device=device, dtype=dtype))
        up = (b.up.to(device=device, dtype=wide) * b.scale).to(dtype)
        pieces.append(Piece(up, r0, r0 + r, b.offset, b.up.shape[0] if b.length is None else b.length))
        r0 += r
    return Prepared(torch.cat(downs, 0) if len(downs) > 1 else downs[0], tuple(pieces))


def own_weights(module, x):
    """A torch Linear's own stored (weight, bias) when they already have the input's dtype and device, else None
    (also when they are computed on access, as under torch.nn.utils.parametrize: no stored tensor to use)."""
    w, b = module._parameters.get("weight"), module._parameters.get("bias")
    if w is None or (b is None and module.bias is not None):
        return None
    for t in (w,) if b is None else (w, b):
        if type(t) not in (torch.nn.Parameter, torch.Tensor) or t.dtype != x.dtype or t.device != x.device:
            return None
    return w, b


# (class test, weights(module, x) -> (weight, bias) or None): Linear classes whose forward is exactly
# F.linear(x, weight, bias) with those tensors. Others (GGUF, fp8 scaled matmuls) keep the separate branch.
_LINEARS = [(lambda cls: cls.forward is torch.nn.Linear.forward, own_weights)]


def plain_linear(test, weights):
    """Register, at import (before any pair runs), Linear classes for which `test(cls)` holds and whose forward
    is F.linear(x, *weights(module, x)): `weights` returns the (weight, bias) that forward would use (cast to
    the compute dtype, patches applied), or None where the module must run its own forward."""
    _LINEARS.append((test, weights))


def _weights_of(cls):
    """The `weights` function registered for a Linear class, or None."""
    if issubclass(cls, torch.nn.Linear):
        for test, weights in reversed(_LINEARS):
            if test(cls):
                return weights
    return None


def _define_addmm_():
    """torch.ops.glance.addmm_(c, a, b): c += a @ b in place, as an op inductor keeps in place (a traced
    Tensor.addmm_ becomes a copy of c and an out-of-place addmm: two extra passes over c). None before torch 2.4."""
    try:
        return torch.ops.glance.addmm_  # defined already (the pack imported under a second name)
    except (AttributeError, RuntimeError):
        pass
    if not hasattr(torch.library, "custom_op"):
        return None

    @torch.library.custom_op("glance::addmm_", mutates_args=("c",))
    def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        c.addmm_(a, b)

    @addmm_.register_fake
    def _(c, a, b):
        return None
    return torch.ops.glance.addmm_


_ADDMM_ = _define_addmm_()


def _addmm_(c, a, b):
    """c += a @ b in place, in eager runs and in compiled graphs."""
    if _ADDMM_ is not None and torch.compiler.is_compiling():
        _ADDMM_(c, a, b)
    else:
        c.addmm_(a, b)


def use_lora_gemm(variant):
    """Compute folded layers with the fused Triton GEMM `variant` ("plain", "tma", "persistent"; see
    fused_gemm), or with cuBLAS and the fold (None, the default). GLANCE_LORA_GEMM sets it at import."""
    global lora_gemm, _gemm
    if variant in (None, ""):
        lora_gemm, _gemm = None, None
        return
    try:
        from . import fused_gemm
    except (ImportError, AttributeError) as e:  # AttributeError: torch < 2.4 has no torch.library.custom_op
        raise ImportError(f"GLANCE_LORA_GEMM={variant}: the fused LoRA GEMM needs Triton and torch >= 2.4 ({e}); "
                          f"unset GLANCE_LORA_GEMM, or install them", name="triton") from e
    if variant not in fused_gemm.VARIANTS:
        raise ValueError(f"GLANCE_LORA_GEMM={variant!r}: no such fused GEMM; use one of "
                         f"{', '.join(fused_gemm.VARIANTS)}, or leave it unset for cuBLAS and the fold")
    lora_gemm, _gemm = variant, fused_gemm


lora_gemm = _gemm = None  # the fused GEMM variant in use and its module (use_lora_gemm)
GEMM_MIN_ROWS = 1024  # fewer rows (tokens x batch, e.g. a text stream) keep cuBLAS: one autotune per row count
_GEMM_WARNED, _GEMM_CHECKED = set(), set()
use_lora_gemm(os.environ.get("GLANCE_LORA_GEMM"))


def _gemm_takes(slot, device, dtype, fin, fout):
    """None when the fused GEMM computes this layer (one branch over the whole output), else why it cannot."""
    pieces = slot[0][2].pieces if len(slot) == 1 and slot[0][2] is not None else ()
    if len(pieces) != 1 or pieces[0].offset != 0 or pieces[0].length != fout:
        return "several branches on one layer (a fused projection such as FLUX's qkv, or stacked adapters)"
    return _gemm.why_not(device, dtype, pieces[0].up.shape[1], fin, fout, lora_gemm)


def _fused(slot, module, x, weight, bias):
    """F.linear(x, weight, bias) plus every branch in `slot`, without a separate pass over the output.

    `weight` is the module's own stored tensor, or a fresh copy its cast just made (fp8, offloaded or patched
    weights). When the layer sees many tokens, updating a weight copy moves fewer bytes than touching the
    output: the delta is added to the copy in the compute dtype (one rounding, as ComfyUI's bf16 merge; the
    stored weights are never written), making one first if the cast did not (2 or 4 weight-sized passes
    against N (in + out) elements). Otherwise the branches are computed first and the base product is
    accumulated onto them by the GEMM itself (beta=1): the output is written once by the small rank-r GEMM
    and read inside the large one, not read and written again after it. With `lora_gemm` set, a fused Triton
    GEMM computes layers of GEMM_MIN_ROWS rows or more that it can take (fused_gemm.why_not) in one pass."""
    x2 = x.reshape(-1, x.shape[-1])
    (n, k), width = x2.shape, weight.shape[0]
    if not torch.compiler.is_compiling():  # a Python counter inside a graph would recompile every call
        for adapter, _, _ in slot:
            adapter.applied += 1
    own = weight is module._parameters.get("weight")  # else a fresh copy made by the layer's cast
    if lora_gemm is not None and n >= GEMM_MIN_ROWS and _gemm_takes(slot, x2.device, x2.dtype, k, width) is None:
        # One GEMM: the rank-r product starts each output tile's accumulator (no weight copy, one output write).
        entry = slot[0][2]
        z = x2 @ entry.down.t()
        args = (x2, weight, bias, z, entry.pieces[0].up)
        y = _gemm.op(*args, lora_gemm) if torch.compiler.is_compiling() else _gemm.VARIANTS[lora_gemm](*args)
        return y.view(*x.shape[:-1], width)
    if n * (k + width) > (4 if own else 2) * k * width:
        if own:
            weight = weight.clone()
        for _, _, entry in slot:
            for p in entry.pieces:
                _addmm_(weight[p.offset:p.offset + p.length], p.up, entry.down[p.r0:p.r1])
        return torch.nn.functional.linear(x, weight, bias)
    out = None
    for _, _, entry in slot:
        z = x2 @ entry.down.t()
        for p in entry.pieces:
            if out is None and p.offset == 0 and p.length == width:  # the usual case: one branch, whole output
                out = torch.addmm(bias, z[:, p.r0:p.r1], p.up.t()) if bias is not None \
                    else z[:, p.r0:p.r1] @ p.up.t()
                continue
            if out is None:
                out = bias.expand(n, width).clone() if bias is not None else x2.new_zeros(n, width)
            _addmm_(out[:, p.offset:p.offset + p.length], z[:, p.r0:p.r1], p.up.t())
    _addmm_(out, x2, weight.t())
    return out.view(*x.shape[:-1], width)


def _apply(slot, x, out):
    """`out` with the branches of every adapter in `slot` added (in place when no grad is needed)."""
    for adapter, module, entry in slot:
        if entry is None or entry.down.device != out.device or entry.down.dtype != out.dtype:
            # Trainable adapters, or a layer computing elsewhere than announced: build this call's view.
            entry = _prepare(adapter.branches[module], out.device, out.dtype)
        if not torch.compiler.is_compiling():  # a Python counter inside a graph would recompile every call
            adapter.applied += 1
        z = x.reshape(-1, x.shape[-1]).to(out.dtype) @ entry.down.t()
        if out.requires_grad or z.requires_grad or not out.is_contiguous():
            delta = torch.zeros(out.numel() // out.shape[-1], out.shape[-1], device=out.device, dtype=out.dtype)
            for p in entry.pieces:
                delta[:, p.offset:p.offset + p.length] = z[:, p.r0:p.r1] @ p.up.t()
            out = out + delta.reshape(out.shape)
        else:
            out2 = out.view(-1, out.shape[-1])
            for p in entry.pieces:
                out2[:, p.offset:p.offset + p.length].addmm_(z[:, p.r0:p.r1], p.up.t())  # no output-sized temp
    return out


def _autocast(device_type):
    """Whether autocast is on for this device type (then products change dtype: the fold stays out)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


def _branched(cls):
    """The subclass of `cls` that adds the bound branches to every output."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        weights_of = _weights_of(cls)

        def forward(self, *args, **kwargs):
            x = args[0] if args else next(iter(kwargs.values()))  # a linear layer's one input
            slot = getattr(self, _SLOT)
            if fuse and weights_of is not None and len(args) + len(kwargs) == 1 and x.dim() >= 2 \
                    and not torch.is_grad_enabled() and not _autocast(x.device.type) \
                    and all(e is not None and e.down.dtype == x.dtype and e.down.device == x.device
                            for _, _, e in slot):
                wb = weights_of(self, x)
                if wb is not None and wb[0].dtype == x.dtype and wb[0].device == x.device:
                    return _fused(slot, self, x, *wb)
            return _apply(slot, x, cls.forward(self, *args, **kwargs))
        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__qualname__": f"{cls.__qualname__}[glance]"})
        _SUBCLASSES[cls], _ORIGINAL[sub] = sub, cls
    return sub


def _say_where_gemm_cannot(adapters, slots, device, dtype):
    """Log once per reason the layers of `slots` the fused GEMM cannot take (checked once per adapter set)."""
    checked = lora_gemm, str(device), dtype, tuple(id(a) for a in adapters)  # a reused id only skips a log line
    if checked in _GEMM_CHECKED:
        return
    _GEMM_CHECKED.add(checked)
    for m, slot in slots.items():
        if _weights_of(_ORIGINAL.get(type(m), type(m))) is not None and all(e is not None for *_, e in slot):
            why = _gemm_takes(slot, torch.device(device), dtype, m.in_features, m.out_features)
            if why is not None and why not in _GEMM_WARNED:
                _GEMM_WARNED.add(why)
                log.warning("Glance: GLANCE_LORA_GEMM=%s is set, but some layers cannot use it (%s); they use "
                            "cuBLAS and the fold", lora_gemm, why)


def _bind(adapters, touched, device, dtype):
    """Give every module of `adapters` its branched class and slot, unbind the rest of `touched`; undo list."""
    slots = {}
    for ad in adapters:
        prepared = None if ad.trainable or device is None else ad._for(device, dtype)
        for m in ad.branches:
            slots.setdefault(m, []).append((ad, m, None if prepared is None else prepared[m]))
    if lora_gemm is not None and device is not None:
        _say_where_gemm_cannot(adapters, slots, device, dtype)
    undo = []
    for m in {*touched, *slots}:
        cls = type(m)
        undo.append((m, cls, m.__dict__.get(_SLOT)))
        base = _ORIGINAL.get(cls, cls)
        if m in slots:
            m.__class__ = _branched(base)
            m.__dict__[_SLOT] = tuple(slots[m])
        else:
            m.__class__ = base
            m.__dict__.pop(_SLOT, None)
    return undo


def _unbind(undo):
    for m, cls, slot in undo:
        m.__class__ = cls
        if slot is None:
            m.__dict__.pop(_SLOT, None)
        else:
            m.__dict__[_SLOT] = slot


@contextlib.contextmanager
def active(*adapters, replace=False, device=None, dtype=None):
    """Within this block, the adapted modules add the given adapters' branches (replace: only them).

    device/dtype: where the model computes (its input device and compute dtype), to use cached copies of
    the branches there; without them each call converts from the stored tensors (what training wants)."""
    prev = _ACTIVE.get()
    new = tuple(a for a in adapters if a is not None)
    new = new if replace else prev + new
    token = _ACTIVE.set(new)
    undo = _bind(new, [m for a in prev for m in a.branches], device, dtype)
    try:
        yield
    finally:
        _unbind(reversed(undo))
        _ACTIVE.reset(token)


def current():
    """The adapters active here (to re-enter the same state later, e.g. in a checkpoint's recomputation)."""
    return _ACTIVE.get()
