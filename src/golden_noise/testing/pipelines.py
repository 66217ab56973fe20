"""Tiny pipelines built offline (no hub), for tests, benchmarks and the toy world's builder.

The components follow diffusers' own SDXL tests (`get_dummy_components`); the tokenizers use a byte-level
CLIP vocabulary (256 byte symbols, the same 256 with an end-of-word mark, and the two special tokens), so
no vocabulary file has to be downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..diffusion import sdxl_scheduler_config

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable-unicode table (GPT-2 style), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_clip_tokenizer(model_max_length: int = 77):
    """A CLIPTokenizer over single bytes (vocab 514): real tokenisation, no download."""
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _tiny_clip_config(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32, layers: int = 2,
                      heads: int = 4, intermediate_size: int = 37):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                          hidden_size=hidden_size, intermediate_size=intermediate_size, num_attention_heads=heads,
                          num_hidden_layers=layers, vocab_size=vocab_size, projection_dim=projection_dim,
                          hidden_act="gelu", layer_norm_eps=1e-5, max_position_embeddings=77)


def tiny_text_encoders(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32, layers: int = 2,
                       heads: int = 4, intermediate_size: int = 37, seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection) with random weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = _tiny_clip_config(vocab_size, hidden_size, projection_dim, layers, heads, intermediate_size)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(config)
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(config)
    return te1.eval(), te2.eval()


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 16, block_out_channels=(8, 16),
                             latent_channels: int = 4):
    """A random tiny `StableDiffusionXLPipeline` (~0.7 MB): latents (4, sample_size, sample_size), and a
    one-level VAE (scale factor 1), so images are `sample_size` pixels square (default 16)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = byte_level_clip_tokenizer()
    te1, te2 = tiny_text_encoders(len(tokenizer), seed=seed)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        block_out_channels=tuple(block_out_channels), layers_per_block=1, sample_size=sample_size,
        in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
        cross_attention_dim=64, norm_num_groups=1)
    scheduler = DDIMScheduler(**sdxl_scheduler_config())
    return StableDiffusionXLPipeline(vae=_tiny_vae(latent_channels, seed + 3, sample_size), text_encoder=te1,
                                     text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=byte_level_clip_tokenizer(),
                                     unet=unet.eval(), scheduler=scheduler, force_zeros_for_empty_prompt=True)


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build the tiny pipeline and save it as a diffusers directory loadable with `--base_model_id path`."""
    return save_tiny_pipeline(path, "sdxl", seed, **kwargs)


# ---------------------------------------------------------------- other families (tests of the family seam)
def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5TokenizerFast over a Unigram vocabulary built in code (the ASCII printables, each also with the
    word-start mark), so no sentencepiece file has to be downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + c, -1.0) for c in chars] + \
        [(c, -2.0) for c in chars] + [("\u2581", -3.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(vocab_size: int, d_model: int, seed: int = 0):
    """A random 1-layer T5EncoderModel of width `d_model`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _clip_with_projection(vocab_size: int, seed: int, hidden_size: int = 32):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(_tiny_clip_config(vocab_size, hidden_size)).eval()


def _tiny_vae(latent_channels: int, seed: int, sample_size: int = 16, **kwargs):
    """A one-level AutoencoderKL (scale factor 1): images are as large as the latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                         up_block_types=["UpDecoderBlock2D"], latent_channels=latent_channels, norm_num_groups=1,
                         sample_size=sample_size, **kwargs)


def build_tiny_sd_pipeline(seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16):
    """A random tiny `StableDiffusionPipeline` (SD 1.5: epsilon, SD 2.1: v_prediction): one CLIP text encoder, no
    pooled embedding, latents (4, sample_size, sample_size), images `sample_size` px, no safety checker."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = byte_level_clip_tokenizer()
    text_encoder, _ = tiny_text_encoders(len(tokenizer), seed=seed)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, norm_num_groups=1)
    scheduler = DDIMScheduler(**{**sdxl_scheduler_config(), "prediction_type": prediction_type})
    return StableDiffusionPipeline(vae=_tiny_vae(4, seed + 3, sample_size, scaling_factor=0.18215),
                                   text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True, sample_size: int = 16):
    """A random tiny `StableDiffusion3Pipeline`: CLIP x2 (+ a tiny T5 unless `with_t5` is False: then
    text_encoder_3=None, as SD3 users save memory), an SD3Transformer2DModel, 16 latent channels, images
    `sample_size` px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer = byte_level_clip_tokenizer()
    torch.manual_seed(seed + 2)
    transformer = SD3Transformer2DModel(sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16,
                                        num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                        joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64)
    t5_tok = tiny_t5_tokenizer() if with_t5 else None
    t5 = tiny_t5_encoder(len(t5_tok), 64, seed + 4) if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(16, seed + 3, sample_size, use_quant_conv=False, use_post_quant_conv=False,
                      scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_with_projection(len(tokenizer), seed), tokenizer=tokenizer,
        text_encoder_2=_clip_with_projection(len(tokenizer), seed + 1), tokenizer_2=byte_level_clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tok)


def build_tiny_flux_pipeline(seed: int = 0, latent_channels: int = 4):
    """A random tiny `FluxPipeline` (FLUX.1 [dev]-like: guidance embedding, dynamic shifting): CLIP + tiny T5, a
    FluxTransformer2DModel over 2x2-packed latents of `latent_channels`; pass height/width (its default is 128 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer = byte_level_clip_tokenizer()
    text_encoder, _ = tiny_text_encoders(len(tokenizer), seed=seed)
    t5_tok = tiny_t5_tokenizer()
    torch.manual_seed(seed + 2)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
                                         guidance_embeds=True)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer.eval(), scheduler=scheduler,
                        vae=_tiny_vae(latent_channels, seed + 3, 16, use_quant_conv=False, use_post_quant_conv=False,
                                      scaling_factor=0.3611, shift_factor=0.1159),
                        text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=tiny_t5_encoder(len(t5_tok), 32, seed + 4), tokenizer_2=t5_tok)


TINY_BUILDERS = {"sdxl": build_tiny_sdxl_pipeline, "sd": build_tiny_sd_pipeline, "sd3": build_tiny_sd3_pipeline,
                 "flux": build_tiny_flux_pipeline}


def save_tiny_pipeline(path: str | Path, family: str = "sdxl", seed: int = 0, **kwargs) -> Path:
    """Build the tiny pipeline of `family` (TINY_BUILDERS) and save it as a diffusers directory."""
    path = Path(path)
    TINY_BUILDERS[family](seed=seed, **kwargs).save_pretrained(path)
    return path
