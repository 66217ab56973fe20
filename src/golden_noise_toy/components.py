"""The toy world's networks: an SDXL-architecture UNet, a small AutoencoderKL, two small CLIP text encoders
(byte-level tokenizers), and the attribute classifier behind the `toy_attributes` reward."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from golden_noise.testing.pipelines import byte_level_clip_tokenizer, tiny_text_encoders

TEXT_HIDDEN = 32      # each CLIP encoder's width; the UNet cross-attends to both concatenated (64)
TIME_EMBED_DIM = 8    # SDXL's addition_time_embed_dim, scaled down
GRID = 2              # the classifier's coarse spatial pooling (GRID x GRID cells) for the position head


@dataclass
class NetworkConfig:
    """Sizes of the world's networks (part of a preset)."""

    vae_channels: tuple = (8, 16, 32)       # len 3 -> VAE scale factor 4: 32 px images <-> 4x8x8 latents
    unet_channels: tuple = (32, 64)
    unet_layers_per_block: int = 1
    unet_head_dim: int = 8
    text_layers: int = 1
    text_intermediate: int = 64
    classifier_channels: tuple = (16, 32, 64)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def build_vae(net: NetworkConfig, image_size: int, seed: int):
    """A small AutoencoderKL (random weights; trained by the builder)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(net.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(net.vae_channels),
                         layers_per_block=1, latent_channels=4, norm_num_groups=1,
                         sample_size=image_size, mid_block_add_attention=False)
    return vae


def build_text_encoders(net: NetworkConfig, seed: int):
    """(tokenizer, tokenizer_2, text_encoder, text_encoder_2): byte-level CLIP tokenizers and small encoders."""
    tokenizer = byte_level_clip_tokenizer()
    te1, te2 = tiny_text_encoders(len(tokenizer), hidden_size=TEXT_HIDDEN, projection_dim=TEXT_HIDDEN,
                                  layers=net.text_layers, heads=4, intermediate_size=net.text_intermediate, seed=seed)
    return tokenizer, byte_level_clip_tokenizer(), te1, te2


def build_unet(net: NetworkConfig, latent_size: int, seed: int):
    """An SDXL-architecture UNet (text_time added conditioning, cross-attention on the low-res level and mid
    block), sized for latents (4, latent_size, latent_size)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    levels = len(net.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        block_out_channels=tuple(net.unet_channels), layers_per_block=net.unet_layers_per_block,
        attention_head_dim=net.unet_head_dim, transformer_layers_per_block=1, use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN, addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN,
        norm_num_groups=max(1, net.unet_channels[0] // 8))


def encode_token_ids(te1, te2, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `StableDiffusionXLPipeline.encode_prompt` computes from token ids (B, 77): the penultimate hidden
    states of both encoders concatenated (B, 77, 64) and text_encoder_2's projected pooled output (B, 32)."""
    out1 = te1(ids, output_hidden_states=True)
    out2 = te2(ids, output_hidden_states=True)
    embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return embeds, out2[0]


@dataclass
class ClassifierConfig:
    """The attribute classifier's config; saved as JSON beside its weights."""

    attributes: dict            # attribute name -> list of values (head order)
    template: str               # the world's caption grammar, e.g. "a {size} {color} {shape}"
    image_size: int = 32
    channels: list = field(default_factory=lambda: [16, 32, 64])


class AttributeClassifier(nn.Module):
    """A small CNN: image (B, 3, H, W) in [0, 1] -> one logit vector per attribute."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers, c_in = [], 3
        for i, c in enumerate(config.channels):  # full resolution, then halve per stage
            layers += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
            if i > 0:
                layers += [nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(c_in * (2 + GRID * GRID), len(values))
                                    for name, values in config.attributes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)  # (B, C, h, w)
        # global mean and max (what and how big) plus a coarse grid (where)
        grid = nn.functional.adaptive_avg_pool2d(h, GRID).flatten(1)  # (B, C * GRID^2)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3)), grid], dim=1)
        return {name: head(h) for name, head in self.heads.items()}
