"""The training plan shared by the ComfyUI node and the diffusers side: everything around `train.train_lora`.

Before the first step: settings resolved against the family's recipe and checked finite, the image checked,
the output names and folder checked (a probe file written and removed there). After the last step: the
pair written with its metadata all or nothing (an overwrite keeps the old pair until every new file is
complete). Per-phase seeds are computed here, modulo 2^64, so every seed a widget allows works.
"""
import errno
import hashlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__
from .errors import GlanceError
from .files import publish, stage
from .lora import GlanceMeta
from .lora.writer import diffusers_export, file_writer, lora_state_dict

SEED_SPACE = 2 ** 64
MAX_RANK = 512
# What `image_sha256` hashes, on both sides: the training image's 8-bit RGB pixels (H x W x 3, row-major,
# after resizing), so the same picture gives the same hash in ComfyUI and on the command line.
HASH_OF = "8-bit RGB pixels"


def phase_seed(seed, k):
    """Seed of the k-th phase's noise and sigma draws (k = 0 slow, 1 fast), wrapped into 0 .. 2^64-1."""
    return (int(seed) + 1000 * (k + 1)) % SEED_SPACE


def init_seed(seed, k):
    """Seed of the k-th phase's LoRA initialisation draws (diffusers/peft side), wrapped into 0 .. 2^64-1."""
    return (int(seed) + k) % SEED_SPACE


@dataclass(frozen=True)
class Recipe:
    """Resolved training settings of one pair: rank, alpha (scale alpha/rank), AdamW lr and weight decay."""
    rank: int
    alpha: float
    lr: float
    weight_decay: float
    caption_dropout: float


def resolve_recipe(family, rank=None, alpha=None, lr=None, caption_dropout=None, names=None):
    """The family's recipe with the given overrides (None or 0: the recipe's; dropout None or < 0: the recipe's).

    Every value is checked finite and in range; `names` maps setting -> the input/flag name used in errors.
    """
    names = {"rank": "rank", "alpha": "alpha", "lr": "learning_rate", "caption_dropout": "caption_dropout",
             "seed": "seed", **(names or {})}
    rec = family.recipe
    for key, v in (("alpha", alpha), ("lr", lr), ("caption_dropout", caption_dropout)):
        if v is not None and not math.isfinite(float(v)):
            raise GlanceError(f"{names[key]}: {v} is not a finite number")
    if rank is not None and not 0 <= int(rank) <= MAX_RANK:
        raise GlanceError(f"{names['rank']}: {rank} is out of range 0..{MAX_RANK} (0 = the family's recipe)")
    rank = int(rank or rec["rank"])
    if alpha is not None and alpha < 0:
        raise GlanceError(f"{names['alpha']}: {alpha} must be positive (0 = 4 x rank)")
    if lr is not None and lr < 0:
        raise GlanceError(f"{names['lr']}: {lr} must be positive (0 = the family's recipe)")
    dropout = rec["caption_dropout"] if caption_dropout is None or caption_dropout < 0 else float(caption_dropout)
    if dropout > 1:
        raise GlanceError(f"{names['caption_dropout']}: {caption_dropout} must be at most 1")
    return Recipe(rank, float(alpha or 4.0 * rank), float(lr or rec["lr"]), rec["weight_decay"], dropout)


def check_seed(seed, name="seed"):
    """Raise GlanceError unless 0 <= seed < 2^64 (the range the node's widget offers)."""
    if not 0 <= int(seed) < SEED_SPACE:
        raise GlanceError(f"{name}: {seed} must be in 0 .. 2^64-1")


def check_finite(tensor, what):
    """Raise GlanceError naming `what` if the tensor holds NaN or inf (before training, not as a diverged loss)."""
    if tensor is not None and torch.is_tensor(tensor) and tensor.is_floating_point():
        bad = (~torch.isfinite(tensor)).sum().item()
        if bad:
            raise GlanceError(f"{what}: {bad} NaN or infinite value(s) of {tensor.numel()}; training on it cannot "
                              "work. Fix the input (it is not the learning rate)")


def image_sha256(image_hwc):
    """sha256 of an image [H, W, 3] (or [1, H, W, 3]) in [0, 1] as 8-bit RGB pixels: what the metadata records."""
    img = image_hwc[0] if image_hwc.dim() == 4 else image_hwc
    return hashlib.sha256((img.detach().float().cpu().numpy() * 255).round().astype(np.uint8).tobytes()).hexdigest()


def _name_max(folder):
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


class PairOutput:
    """Where one pair goes: <folder>/<name>_<phase>.safetensors (+ _diffusers exports), checked before training.

    `input_name` and `folder_name` name the node input / flag in errors (output_name, --name, --out-dir);
    `overwrite_hint` says how to allow overwriting there.
    """
    SUFFIX = ".safetensors"
    EXPORT = "_diffusers.safetensors"
    TEMP_EXTRA = len(".") + len(".XXXXXXXX.part") + 8  # the staged and backup names are this much longer

    def __init__(self, folder, name, phases, overwrite=False, export_diffusers=False, input_name="output_name",
                 folder_name="folder", overwrite_hint="allow overwriting"):
        self.folder, self.name, self.phases = os.fspath(folder), name, tuple(phases)
        self.overwrite, self.export_diffusers = overwrite, export_diffusers
        self.input_name, self.folder_name, self.overwrite_hint = input_name, folder_name, overwrite_hint
        self.check_name()
        self.paths = {p: os.path.join(self.folder, f"{name}_{p}{self.SUFFIX}") for p in self.phases}
        self.exports = ({p: self.paths[p][:-len(self.SUFFIX)] + self.EXPORT for p in self.phases}
                        if export_diffusers else {})

    def check_name(self):
        """Refuse empty names, separators, NUL and surrounding spaces."""
        name, label = self.name, self.input_name
        if not name or not str(name).strip():
            raise GlanceError(f"{label}: empty; give the pair a name")
        if "\x00" in name:
            raise GlanceError(f"{label}: {name!r} contains a NUL character")
        if any(c in name for c in "/\\:") or name.strip() in (".", "..") or name != name.strip():
            raise GlanceError(f"{label}: {name!r} must be a plain file name (no folders, separators or "
                              "surrounding spaces)")

    def all_paths(self):
        """Every file the pair will write."""
        return [*self.paths.values(), *self.exports.values()]

    def check(self):
        """Everything checkable before training: folder usable and writable, names short enough, none taken."""
        folder = self.folder
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise GlanceError(f"{self.folder_name}: {folder} is a file, not a folder; move it away or choose "
                              "another folder")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise GlanceError(f"{self.folder_name}: cannot create {folder}: {e.strerror or e}") from None
        limit = _name_max(folder)
        longest = max(self.all_paths(), key=lambda p: len(os.path.basename(p).encode()))
        if len(os.path.basename(longest).encode()) + self.TEMP_EXTRA > limit:
            room = limit - self.TEMP_EXTRA - len(os.path.basename(longest).encode()) + len(self.name.encode())
            raise GlanceError(f"{self.input_name}: {self.name!r} is too long for this file system ({limit} bytes "
                              f"a file name, including the temporary name while writing); use at most {room} "
                              "bytes")
        taken = [p for p in self.all_paths() if os.path.lexists(p)]
        if taken and not self.overwrite:
            raise GlanceError(f"{self.input_name}: {', '.join(taken)} exists; choose another name or "
                              f"{self.overwrite_hint}")
        for p in taken:
            if os.path.isdir(p):
                raise GlanceError(f"{self.input_name}: {p} is a folder; it cannot be overwritten by the pair")
        self._probe()
        return self

    def _probe(self):
        """Write and remove a file in the folder: permissions, read-only mounts and full disks show now."""
        probe = os.path.join(self.folder, f".{self.name}.probe{'X' * 8}.part"[:_name_max(self.folder)])
        try:
            with open(probe, "wb") as fh:
                fh.write(b"\0" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
            os.unlink(probe)
        except OSError as e:
            if os.path.exists(probe):
                os.unlink(probe)
            why = {errno.EROFS: "read-only file system", errno.ENOSPC: "no space left",
                   errno.EACCES: "permission denied", errno.EPERM: "permission denied"}.get(e.errno, str(e))
            raise GlanceError(f"{self.folder_name}: cannot write into {self.folder}: {why}") from None

    def write(self, trained, metas, namespace):
        """Write every file of the pair all or nothing; returns the written paths.

        trained {phase: {module name: (down, up, alpha)}}, metas {phase: GlanceMeta}. Every file is finished
        under a temporary name first; only then are they moved into place together (old files restored on
        any failure).
        """
        staged = {}
        try:
            for phase in self.phases:
                modules, meta = trained[phase], metas[phase]
                if not modules:
                    raise GlanceError(f"{phase} LoRA: nothing to save (no modules)")
                staged[self.paths[phase]] = stage(self.paths[phase], file_writer(
                    lora_state_dict(modules, namespace), meta.to_header()))
                if self.export_diffusers:
                    staged[self.exports[phase]] = stage(self.exports[phase], file_writer(
                        *diffusers_export(self.exports[phase], modules, meta)))
        except BaseException:
            for tmp in staged.values():
                if os.path.exists(tmp):
                    os.unlink(tmp)
            raise
        try:
            return publish(staged, self.overwrite)
        except FileExistsError as e:
            raise GlanceError(f"{self.input_name}: {e} appeared while training; nothing was written") from None


def pair_meta(phase, family_name, sched, recipe, targets, image_sha, losses, extra):
    """GlanceMeta of one trained phase; `extra` adds trainer-specific fields (seed, dtype, size...)."""
    return GlanceMeta(phase=phase, family=family_name, sigmas=sched.phase_sigmas(phase), rank=recipe.rank,
                      alpha=float(recipe.alpha), target_modules=list(targets), schedule=sched.to_dict(),
                      image_sha256=image_sha, pack_version=__version__,
                      extra={"learning_rate": recipe.lr, "caption_dropout": recipe.caption_dropout, **extra,
                             "final_loss": losses[-1], "losses": losses})
