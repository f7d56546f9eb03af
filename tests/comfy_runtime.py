"""Find and start the real ComfyUI runtime inside the test process, and build tiny real-architecture models.

ComfyUI is looked for in COMFYUI_PATH, then an enclosing ComfyUI (this pack inside custom_nodes/),
then ~/comfy/ComfyUI. The runtime runs on the CPU (ComfyUI's --cpu) unless GLANCE_TEST_DEVICE=cuda.
"""
import importlib.util
import os
import sys

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOW_TO = ("set COMFYUI_PATH to a ComfyUI checkout, put this pack in ComfyUI/custom_nodes/, or check ComfyUI "
          "out into ~/comfy/ComfyUI (and install its requirements)")


def _is_comfy(path):
    return bool(path) and os.path.isfile(os.path.join(path, "main.py")) and \
        os.path.isdir(os.path.join(path, "comfy"))


def find_comfyui():
    """(path, where it came from) of a ComfyUI checkout, or (None, reason)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return (env, "COMFYUI_PATH") if _is_comfy(env) else (None, f"COMFYUI_PATH={env} is not a ComfyUI checkout")
    parent = os.path.dirname(PACK_ROOT)
    if os.path.basename(parent) == "custom_nodes" and _is_comfy(os.path.dirname(parent)):
        return os.path.dirname(parent), "enclosing ComfyUI"
    home = os.path.expanduser("~/comfy/ComfyUI")
    if _is_comfy(home):
        return home, "~/comfy/ComfyUI"
    return None, "no ComfyUI found"


GGUF_HOW_TO = ("set COMFYUI_GGUF_PATH to a checkout of https://github.com/city96/ComfyUI-GGUF, or check it out into "
               "<ComfyUI>/custom_nodes/ComfyUI-GGUF (and pip install gguf)")


class DeviceError(RuntimeError):
    """GLANCE_TEST_DEVICE asks for a device this machine cannot give."""


def find_comfyui_gguf():
    """(path, where it came from) of a ComfyUI-GGUF checkout, or (None, reason)."""
    env = os.environ.get("COMFYUI_GGUF_PATH")
    if env:
        path, where = env, "COMFYUI_GGUF_PATH"
    else:
        comfy, why = find_comfyui()
        if comfy is None:
            return None, why
        path, where = os.path.join(comfy, "custom_nodes", "ComfyUI-GGUF"), "the ComfyUI's custom_nodes"
    if not all(os.path.isfile(os.path.join(path, f)) for f in ("__init__.py", "nodes.py", "loader.py", "ops.py")):
        return None, f"no ComfyUI-GGUF checkout at {path} ({where})"
    return path, where


def load_comfyui_gguf(path, name="comfyui_gguf"):
    """Import a ComfyUI-GGUF checkout as ComfyUI imports a custom node pack (start() first)."""
    return import_by_path(name, path)


_started = None
DEVICES = ("cpu", "cuda")


def runtime_device():
    """The device the test runtime runs on: GLANCE_TEST_DEVICE (cpu or cuda), cpu when unset.

    DeviceError when it names something else, or cuda on a machine where torch sees no CUDA device."""
    device = os.environ.get("GLANCE_TEST_DEVICE", "") or "cpu"
    if device not in DEVICES:
        raise DeviceError(f"GLANCE_TEST_DEVICE={device!r}: use one of {', '.join(DEVICES)}")
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise DeviceError(f"GLANCE_TEST_DEVICE=cuda but torch {torch.__version__} sees no CUDA device: run on "
                              "a machine with an NVIDIA GPU and a CUDA build of torch, or unset GLANCE_TEST_DEVICE")
    return device


def _use_device(args):
    """Point ComfyUI's args at the test device; on CUDA, make float32 maths exact (no TF32)."""
    import torch
    if runtime_device() == "cpu":
        args.cpu = True
        return
    args.cpu = False
    # TF32 rounds float32 convolutions (cuDNN's default) and matmuls to 10 mantissa bits, with a run-dependent
    # algorithm choice: the tests' 1e-4 equalities compare float32 results, so keep float32 exact.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def start(base_dir):
    """Import ComfyUI in this process (runtime_device(), folders under base_dir); idempotent. Returns its path."""
    global _started
    if _started:
        return _started
    path, where = find_comfyui()
    if path is None:
        raise RuntimeError(f"{where}: {HOW_TO}")
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args  # must precede comfy.model_management
    _use_device(args)
    # ComfyUI's `utils` package must be imported before `nodes` puts comfy/ (with its utils.py) first on sys.path.
    import utils.install_util  # noqa: F401
    import folder_paths
    for sub in ("output", "input", "temp", "loras", "diffusion_models", "vae"):
        os.makedirs(os.path.join(base_dir, sub), exist_ok=True)
    folder_paths.set_output_directory(os.path.join(base_dir, "output"))
    folder_paths.set_input_directory(os.path.join(base_dir, "input"))
    folder_paths.set_temp_directory(os.path.join(base_dir, "temp"))
    folder_paths.add_model_folder_path("loras", os.path.join(base_dir, "loras"), is_default=True)
    folder_paths.add_model_folder_path("diffusion_models", os.path.join(base_dir, "diffusion_models"),
                                       is_default=True)
    folder_paths.add_model_folder_path("vae", os.path.join(base_dir, "vae"), is_default=True)
    import comfy.model_management as mm  # initialise devices with args.cpu set
    if runtime_device() == "cuda" and mm.get_torch_device().type != "cuda":
        raise DeviceError(f"GLANCE_TEST_DEVICE=cuda but ComfyUI picked {mm.get_torch_device()}")
    _started = path
    return path


def import_by_path(name, root):
    """Import the package in folder `root` as module `name`, the way ComfyUI imports node packs; idempotent."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]  # a half-imported package would hide the error on the next call
        raise
    return mod


def stand_ins():
    """The test-only stand-in node pack (tests/stand_in_nodes: tiny VAE, text encoder, model loaders), imported once."""
    return import_by_path("glance_test_stand_ins_lib", os.path.join(PACK_ROOT, "tests", "stand_in_nodes"))


def load_pack(name="glance_pack"):
    """Import this repository as a package the way ComfyUI does (by path, relative imports inside)."""
    return import_by_path(name, PACK_ROOT)


# Tiny configs of the real classes. FLUX rope axes must sum to hidden/heads; Qwen's to attention_head_dim;
# MMDiT width is 64 x depth.
TINY_CONFIGS = {
    "flux": dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                 hidden_size=64, mlp_ratio=4.0, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[4, 6, 6],
                 theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True),
    "qwen-image": dict(image_model="qwen_image", patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                       axes_dims_rope=(4, 6, 6)),
    "sd3": dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=32,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 32, "out_features": 128}},
                num_patches=4096, pos_embed_max_size=64, pos_embed_scaling_factor=None,
                x_block_self_attn_layers=[]),
}
CONTEXT_DIM = 32


def tiny_config(family):
    """ComfyUI's model config (comfy.supported_models) of `family` at the tiny size of TINY_CONFIGS."""
    import comfy.supported_models as sm
    cls = {"flux": sm.Flux, "qwen-image": sm.QwenImage, "sd3": sm.SD3}[family]
    return cls(dict(TINY_CONFIGS[family]))


def tiny_model(family, seed=0):
    """A ModelPatcher around ComfyUI's own model class for `family` at tiny width, weights initialised."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    model = tiny_config(family).get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # comfy.ops layers skip init (torch.empty): give every weight small random values
        # Buffers too: SD3's pos_embed is an uninitialised buffer that real checkpoints fill.
        for p in [*model.diffusion_model.parameters(), *model.diffusion_model.buffers()]:
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_conditioning(family, tokens=6, seed=0):
    """ComfyUI CONDITIONING without a text encoder, in the shape each family expects."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randn(1, tokens, CONTEXT_DIM, generator=gen)
    if family == "qwen-image":
        return [[ctx, {}]]
    extra = {"pooled_output": torch.randn(1, 32, generator=gen)}
    if family == "flux":
        extra["guidance"] = 3.5
    return [[ctx, extra]]


def loras_dir():
    """ComfyUI's (test) loras folder."""
    import folder_paths
    return folder_paths.get_folder_paths("loras")[0]


def linear_layers(patcher, include=("blocks",)):
    """{module path without 'diffusion_model.': (in, out)} of the model's 2-D weights inside its blocks."""
    out = {}
    for k, v in patcher.model.state_dict().items():
        if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() == 2 and \
                any(s in k for s in include):
            out[k[len("diffusion_model."):-len(".weight")]] = (v.shape[1], v.shape[0])
    return out


def qwen_block_model(layers=1, init="randn", seed=0):
    """ComfyUI's Qwen-Image at its real width (3072, MLP 12288, modulation 18432) with `layers` blocks."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    config = sm.QwenImage({"image_model": "qwen_image", "num_layers": layers})
    model = config.get_model({})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            if init == "zeros":
                p.zero_()
            else:  # scaled so activations stay O(1) through the block
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 / max(1, p.shape[-1]) ** 0.5))
    model.diffusion_model.to(torch.float32)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def stock_merged(patcher, lora_path, strength=1.0):
    """(base weights, weights after ComfyUI's stock LoraLoader path merged the file, patched keys); restores."""
    import torch
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    comfy.model_management.unload_all_models()  # a model ComfyUI still holds loaded would not be re-patched
    sd = comfy.utils.load_torch_file(str(lora_path), safe_load=True)
    new, _ = comfy.sd.load_lora_for_models(patcher, None, sd, strength, 0)
    base = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    new.patch_model(device_to=torch.device("cpu"))
    try:
        merged = {k: v.clone() for k, v in new.model.state_dict().items()}
    finally:
        new.unpatch_model(device_to=torch.device("cpu"))
    after = patcher.model.state_dict()
    assert all(torch.equal(after[k], base[k]) for k in base)  # unpatched cleanly
    return base, merged, set(new.patches)
