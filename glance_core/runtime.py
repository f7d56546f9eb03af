"""Run-time LoRA branches on torch modules, switched per model call without touching any weight.

Each adapted module gets one forward hook that adds  scale * B(A x)  to its output (or to a slice of
it, for fused layers such as FLUX's qkv) for the adapters active in the current context. Nothing is
merged, so switching between the slow and the fast adapter is free, the base weights stay bit-exact,
and other patches merged into the weights (stock LoRAs) stack underneath.
"""
import contextlib
import contextvars

import torch

_ACTIVE = contextvars.ContextVar("glance_active_adapters", default=())
_HOOK_ATTR = "_glance_lora_hook"


class Adapter:
    """One LoRA (for example the Slow one) as run-time branches, keyed by module object."""

    def __init__(self, name, trainable=False):
        self.name = name
        self.trainable = trainable  # parameters change every step: rebuild device views each call, cache nothing
        self.branches = {}  # module -> list of (down (r,in), up (len,r), scale, offset, length)
        self.applied = 0    # module applications so far: how tests see that the adapter really ran
        self._prepared = (None, None)  # ((device, dtype), {module: _prepare(...)})

    def add(self, module, down, up, scale, offset=0, length=None):
        """Add a branch: output[..., offset:offset+length] += scale * up @ down @ x (length None: whole output)."""
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{self.name}: a run-time branch needs 2-D down/up of one rank, got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        self.branches.setdefault(module, []).append((down, up, float(scale), offset, length))
        self._prepared = (None, None)
        install(module)

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
            bs[:] = [(d.detach().to(storage).requires_grad_(False), u.detach().to(storage).requires_grad_(False), *rest)
                     for d, u, *rest in bs]
        self.trainable = False
        self._prepared = (None, None)

    def _for(self, device, dtype):
        key, prepared = self._prepared
        if key == (device, dtype):
            return prepared
        for module, branches in self.branches.items():
            # Keep one copy only: where the branches already live on this device, convert them in place.
            if all(b[0].device == device for b in branches):
                branches[:] = [(d.to(dtype), u.to(dtype), *rest) for d, u, *rest in branches]
        prepared = {m: _prepare(bs, device, dtype) for m, bs in self.branches.items()}
        self._prepared = ((device, dtype), prepared)  # one device/dtype at a time: no growth
        return prepared

    def release(self):
        """Drop the device copies (they are rebuilt on the next call)."""
        self._prepared = (None, None)

    def apply(self, module, x, out):
        """Return `out` with this adapter's branches of `module` added (in place when no grad is needed)."""
        if self.trainable:  # parameters change every step: build this module's view afresh, cache nothing
            branches = self.branches.get(module)
            entry = None if branches is None else _prepare(branches, out.device, out.dtype)
        else:
            entry = self._for(out.device, out.dtype).get(module)
        if entry is None:
            return out
        self.applied += 1
        a, pieces = entry
        z = x.reshape(-1, x.shape[-1]).to(out.dtype) @ a.t()
        if out.requires_grad or z.requires_grad or not out.is_contiguous():
            delta = torch.zeros(out.numel() // out.shape[-1], out.shape[-1], device=out.device, dtype=out.dtype)
            for b, scale, r0, r1, off, length in pieces:
                delta[:, off:off + length] = scale * (z[:, r0:r1] @ b.t())
            return out + delta.reshape(out.shape)
        out2 = out.view(-1, out.shape[-1])
        for b, scale, r0, r1, off, length in pieces:
            out2[:, off:off + length].addmm_(z[:, r0:r1], b.t(), alpha=scale)  # no output-sized temporary
        return out


def _prepare(branches, device, dtype):
    """(A_cat, [(B, scale, r0, r1, offset, length)]) of one module's branches on a device and dtype."""
    downs, pieces, r0 = [], [], 0
    for down, up, scale, off, length in branches:
        r = down.shape[0]
        downs.append(down.to(device=device, dtype=dtype))
        pieces.append((up.to(device=device, dtype=dtype), scale, r0, r0 + r, off,
                       up.shape[0] if length is None else length))
        r0 += r
    return (torch.cat(downs, 0) if len(downs) > 1 else downs[0]), pieces


def _hook(module, args, out):
    for adapter in _ACTIVE.get():
        out = adapter.apply(module, args[0], out)
    return out


def install(module):
    """Give a module the Glance forward hook (once; it does nothing while no adapter is active)."""
    if getattr(module, _HOOK_ATTR, None) is None:
        setattr(module, _HOOK_ATTR, module.register_forward_hook(_hook))


def uninstall(module):
    """Remove the hook from a module."""
    handle = getattr(module, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(module, _HOOK_ATTR, None)


@contextlib.contextmanager
def active(*adapters, replace=False):
    """Within this block, model calls on this thread/task add the given adapters' branches (replace: only them)."""
    new = tuple(a for a in adapters if a is not None)
    token = _ACTIVE.set(new if replace else _ACTIVE.get() + new)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current():
    """The adapters active here (to re-enter the same state later, e.g. in a checkpoint's recomputation)."""
    return _ACTIVE.get()
