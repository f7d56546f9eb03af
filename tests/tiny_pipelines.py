"""Tiny diffusers pipelines with the real architectures, saved as folders the command line can load offline."""
import json

import torch

WORDS = ["a", "an", "the", "cat", "dog", "red", "blue", "teapot", "fox", "in", "on", "snow", "forest", "photo", "of"]


def _tokenizer(max_length):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=max_length), len(vocab)


def _tiny_vae(scaling_factor, shift_factor):
    """A 16-channel AutoencoderKL (8x down) a few kB big, with the family's latent scaling and shift."""
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         latent_channels=16, norm_num_groups=4, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def save_tiny_flux(folder):
    """A FluxPipeline (transformer, VAE, CLIP and T5 encoders, tokenizers) a few MB big, saved to `folder`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    torch.manual_seed(0)
    tok, n = _tokenizer(77)
    tok2, _ = _tokenizer(64)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=n, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    vae = _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
    transformer = tiny_flux_transformer(seed=None)
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                            max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(folder)
    with open(f"{folder}/model_index.json") as fh:
        assert json.load(fh)["_class_name"] == "FluxPipeline"
    return folder


def save_tiny_sd3(folder):
    """A StableDiffusion3Pipeline (transformer, VAE, two CLIPs with projection, T5, tokenizers) a few MB big."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    torch.manual_seed(0)
    tok, n = _tokenizer(77)
    tok3, _ = _tokenizer(64)

    def clip():
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32, pad_token_id=0, bos_token_id=1, eos_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=n, d_model=64, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    vae = _tiny_vae(scaling_factor=1.5305, shift_factor=0.0609)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                                        pos_embed_max_size=64)
    pipe = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip(), tokenizer=tok, text_encoder_2=clip(), tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=tok3, transformer=transformer)
    pipe.save_pretrained(folder)
    return folder


def tiny_flux_transformer(in_channels=64, heads=2, seed=0):
    """A diffusers FluxTransformer2DModel with one double and one single block, head width 16 (seed None: the
    global generator as it stands)."""
    from diffusers import FluxTransformer2DModel
    if seed is not None:
        torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def peft_deltas(model, adapter="default"):
    """Delta W per module as peft computes it (scaling * B @ A), keyed by module path, float32."""
    from peft.tuners.lora import LoraLayer
    return {name.replace("base_model.model.", ""): mod.get_delta_weight(adapter).float()
            for name, mod in model.named_modules() if isinstance(mod, LoraLayer) and adapter in mod.lora_A}
