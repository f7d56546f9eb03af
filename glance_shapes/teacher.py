"""The bundled teacher: diffusers' SD3Transformer2DModel (real MMDiT joint-attention blocks) at small width,
in pixel space (32x32 RGB, 4x4 patches), conditioned on caption attributes through learned embeddings.

It is a velocity model: velocity(x, sigma, cond) with x in [-1, 1] pixel space and sigma in [0, 1]
(x_sigma = (1 - sigma) x0 + sigma noise); the transformer itself is given timestep = 1000 * sigma.
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass

import torch

from glance_core.errors import GlanceError
from .data import SIZE, SLOTS

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = os.path.join(HERE, "weights", "teacher.safetensors")
RECORD = os.path.join(HERE, "weights", "teacher.json")  # config, sha256 of the weights, how they were trained
from .family import FAMILY  # noqa: E402,F401  (the engine takes the object)


@dataclass(frozen=True)
class TeacherConfig:
    """Architecture of the teacher (stored with its weights)."""
    size: int = SIZE
    patch: int = 4
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    text_dim: int = 64


class AttributeEncoder(torch.nn.Module):
    """The teacher's 'text encoder': one learned token per caption slot (index len(vocab) = empty caption)."""

    def __init__(self, dim):
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(len(vocab) + 1, dim) for _, vocab in SLOTS)

    def forward(self, indices):
        """[B, 4] slot indices -> (tokens [B, 4, dim], pooled [B, dim])."""
        tokens = torch.stack([t(indices[:, k]) for k, t in enumerate(self.tables)], dim=1)
        return tokens, tokens.mean(dim=1)


class Teacher(torch.nn.Module):
    """Attribute encoder + SD3 MMDiT; `velocity` is the model call everything else uses."""

    def __init__(self, config=TeacherConfig()):
        super().__init__()
        from diffusers import SD3Transformer2DModel
        c = self.config = config
        self.encoder = AttributeEncoder(c.text_dim)
        self.transformer = SD3Transformer2DModel(
            sample_size=c.size, patch_size=c.patch, in_channels=3, out_channels=3, num_layers=c.layers,
            attention_head_dim=c.head_dim, num_attention_heads=c.heads, joint_attention_dim=c.text_dim,
            caption_projection_dim=c.heads * c.head_dim, pooled_projection_dim=c.text_dim,
            pos_embed_max_size=c.size // c.patch, qk_norm="rms_norm")

    @staticmethod
    def cond(captions):
        """[B, 4] slot indices of captions."""
        return torch.tensor([c.indices for c in captions])

    @staticmethod
    def empty_like(cond):
        """The empty caption's indices, one row per row of `cond`."""
        return torch.tensor([len(v) for _, v in SLOTS]).expand(len(cond), -1)

    def guided_velocity(self, x, sigma, cond, cfg=1.0):
        """Guided velocity v_empty + cfg * (v_cond - v_empty) in one batched call (cfg 1: the plain velocity)."""
        if cfg == 1.0:
            return self.velocity(x, sigma, cond)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        v_cond, v_empty = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                        torch.cat([cond, self.empty_like(cond)])).chunk(2)
        return v_empty + cfg * (v_cond - v_empty)

    def velocity(self, x, sigma, cond):
        """Predicted velocity (noise - x0) at pixels x [B, 3, 32, 32] for sigmas [B] or scalar, in [0, 1]."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        tokens, pooled = self.encoder(cond.to(x.device))
        return self.transformer(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=sigma * 1000, return_dict=False)[0]


def sha256(path):
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_record(path=RECORD):
    """The teacher's record (config, sha256, training settings and results) as a dict."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise GlanceError(f"teacher record {path}: cannot be read ({e})") from None


def load(path=WEIGHTS, record=RECORD, check_hash=True):
    """The teacher in eval mode with frozen weights, after checking the file's sha256 against the record."""
    from safetensors.torch import load_file
    rec = read_record(record)
    if not os.path.exists(path):
        raise GlanceError(f"teacher weights {path} are missing (retrain: python -m glance_shapes.train_teacher)")
    if check_hash:
        got = sha256(path)
        if got != rec["sha256"]:
            raise GlanceError(f"teacher weights {path}: sha256 {got[:16]}... is not the recorded "
                              f"{rec['sha256'][:16]}... (file changed or damaged; see {record})")
    model = Teacher(TeacherConfig(**rec["config"]))
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise GlanceError(f"teacher weights {path} do not fit the recorded architecture "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval().requires_grad_(False)


def config_dict(config):
    """Plain-data form of a TeacherConfig."""
    return asdict(config)
