"""UNet families: SDXL (two CLIP encoders, pooled embedding, micro-conditioning) and SD 1.5 / 2.1 (one CLIP
encoder, no pooled embedding), each with epsilon or v-prediction as the scheduler config says. Their golden step
(built by golden.golden_step from `predict` and the scheduler config) is DDIM denoise + DDIM inversion with the
scheduler's own conversion of the model output."""
from __future__ import annotations

import torch

from .base import Conditioning, DiffusionFamily, register_family


def sdxl_scheduler_config() -> dict:
    """SDXL base 1.0's scheduler config (scaled-linear betas, leading spacing, offset 1), as DDIM."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
                prediction_type="epsilon")


def sdxl_time_ids(height: int, width: int, batch: int, device=None, dtype=None) -> torch.Tensor:
    """SDXL added conditioning [orig_h, orig_w, crop_top, crop_left, target_h, target_w] -> (B, 6)."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=dtype or torch.float32, device=device)
    return row.expand(batch, 6).clone()


class UNetFamily(DiffusionFamily):
    """What the UNet families share: the UNet forward (the golden step is DDIM on the pipeline's scheduler config)."""

    denoiser_name = "unet"

    def forward(self, z: torch.Tensor, t, kwargs: dict) -> torch.Tensor:
        return self.denoiser(z, t, **kwargs, return_dict=False)[0]



@register_family
class SDXLFamily(UNetFamily):
    """StableDiffusionXLPipeline (SDXL base, Turbo, Lightning/Hyper-SD UNets): pooled = text_encoder_2's projection."""

    name = "sdxl"
    pooled_source = "text_encoder_2"

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and (
            getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "tokenizer_2"))

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=None, height=None, width=None, with_uncond=True) -> Conditioning:
        prompts = list(prompts)
        device = self.pipe.unet.device
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_uncond, negative_prompt=negative_prompt)
        height, width = self.image_size(height, width)
        time_ids = sdxl_time_ids(height, width, len(prompts), device=device, dtype=embeds.dtype)
        return Conditioning(embeds, neg if with_uncond else None, pooled, neg_pooled if with_uncond else None,
                            time_ids)

    def pooled_dim(self) -> int | None:
        te2 = getattr(self.pipe, "text_encoder_2", None)
        return int(te2.config.projection_dim) if te2 is not None else None

    def token_dim(self) -> int:
        return sum(int(te.config.hidden_size) for te in (getattr(self.pipe, "text_encoder", None),
                                                        getattr(self.pipe, "text_encoder_2", None)) if te is not None)


@register_family
class SDFamily(UNetFamily):
    """StableDiffusionPipeline (SD 1.5: epsilon; SD 2.1: v_prediction): no pooled embedding, auto = mean_token."""

    name = "sd"

    @classmethod
    def matches(cls, pipe) -> bool:
        return getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=None, height=None, width=None, with_uncond=True) -> Conditioning:
        embeds, neg = self.pipe.encode_prompt(prompt=list(prompts), device=self.pipe.unet.device,
                                              num_images_per_prompt=1, do_classifier_free_guidance=with_uncond,
                                              negative_prompt=negative_prompt)
        return Conditioning(embeds, neg if with_uncond else None)

    def token_dim(self) -> int:
        return int(self.pipe.text_encoder.config.hidden_size)
