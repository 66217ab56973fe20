"""Tiny pipelines built offline (no hub), for tests, benchmarks and the toy world's builder.

The components follow diffusers' own SDXL tests (`get_dummy_components`); the tokenizers use a byte-level
CLIP vocabulary (256 byte symbols, the same 256 with an end-of-word mark, and the two special tokens), so
no vocabulary file has to be downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

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


def tiny_text_encoders(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32, layers: int = 2,
                       heads: int = 4, intermediate_size: int = 37, seed: int = 0):
    """(CLIPTextModel, CLIPTextModelWithProjection) with random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                            hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_attention_heads=heads, num_hidden_layers=layers, vocab_size=vocab_size,
                            projection_dim=projection_dim, hidden_act="gelu", layer_norm_eps=1e-5,
                            max_position_embeddings=77)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(config)
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(config)
    return te1.eval(), te2.eval()


def build_tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 16, block_out_channels=(8, 16),
                             latent_channels: int = 4):
    """A random tiny `StableDiffusionXLPipeline` (~0.7 MB): latents (4, sample_size, sample_size), and a
    one-level VAE (scale factor 1), so images are `sample_size` pixels square (default 16)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from ..diffusion import sdxl_scheduler_config

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
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(block_out_channels=[8], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=latent_channels, norm_num_groups=1,
                        sample_size=sample_size)
    scheduler = DDIMScheduler(**sdxl_scheduler_config())
    return StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=byte_level_clip_tokenizer(), unet=unet.eval(), scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Build the tiny pipeline and save it as a diffusers directory loadable with `--base_model_id path`."""
    path = Path(path)
    build_tiny_sdxl_pipeline(seed=seed, **kwargs).save_pretrained(path)
    return path
