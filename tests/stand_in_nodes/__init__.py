"""Test-only ComfyUI node pack: tiny real-architecture stand-ins for the model, VAE and text encoder nodes,
so that example workflows run on CPU in seconds. Never shipped to users (it lives under tests/)."""
import hashlib
import os
import sys

import torch
from comfy_api.v0_0_2 import ComfyExtension, io

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # tests/, through symlinks
import comfy_runtime  # noqa: E402

FAMILIES = ["qwen-image", "flux", "sd3"]
_cache = {}


def _randomise(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
            p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in ** 0.5 if p.dim() > 1 else 0.01))


def tiny_vae(family):
    """A comfy.sd.VAE of the family's real VAE kind with random weights: Wan 2.1 for Qwen-Image, 16-channel
    TAESD otherwise."""
    import comfy.sd
    if ("vae", family) not in _cache:
        if family == "qwen-image":
            from comfy.ldm.wan.vae import WanVAE
            m = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], dropout=0.0)
        else:
            from comfy.taesd.taesd import TAESD
            m = TAESD(latent_channels=16)
        _randomise(m, 0)
        _cache[("vae", family)] = comfy.sd.VAE(sd=m.state_dict())
    return _cache[("vae", family)]


class GlanceTestTinyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GlanceTestTinyModel", category="testing/glance",
                         inputs=[io.Combo.Input("family", options=FAMILIES)], outputs=[io.Model.Output()])

    @classmethod
    def execute(cls, family) -> io.NodeOutput:
        if ("model", family) not in _cache:
            _cache[("model", family)] = comfy_runtime.tiny_model(family)
        return io.NodeOutput(_cache[("model", family)])


class GlanceTestTinyVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GlanceTestTinyVAE", category="testing/glance",
                         inputs=[io.Combo.Input("family", options=FAMILIES)], outputs=[io.Vae.Output()])

    @classmethod
    def execute(cls, family) -> io.NodeOutput:
        return io.NodeOutput(tiny_vae(family))


class GlanceTestConditioning(io.ComfyNode):
    """Text to conditioning without a text encoder: a deterministic embedding of the text."""
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="GlanceTestConditioning", category="testing/glance",
                         inputs=[io.Combo.Input("family", options=FAMILIES), io.String.Input("text", multiline=True)],
                         outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, family, text) -> io.NodeOutput:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
        return io.NodeOutput(comfy_runtime.tiny_conditioning(family, seed=seed))


class StandIns(ComfyExtension):
    async def get_node_list(self):
        return [GlanceTestTinyModel, GlanceTestTinyVAE, GlanceTestConditioning]


async def comfy_entrypoint():
    return StandIns()
