"""Flow-matching families: a transformer predicts the velocity v, the scheduler is FlowMatchEulerDiscreteScheduler.

The golden step is a contract (golden.FlowGoldenStep, built from the family's `schedule` and `predict`): with
`set_timesteps(N)` giving sigmas s0 > s1 and timesteps t0, t1, x_prev = x + (s1 - s0) v_cfg(x, t0, w_l) and
x' = x_prev + (s0 - s1) v_cfg(x_prev, t1, w_w).

`FlowMatchingFamily` holds what every flow pipeline with classifier-free guidance shares (schedule, sizes); a
family adds its prompt encoding, its transformer call and its text embedding. SD3/SD3.5 is here; another CFG flow
pipeline (SANA, PixArt-Sigma) would be one more subclass like `SD3Family` (see the README).
"""
from __future__ import annotations

import torch

from .base import Conditioning, DiffusionFamily, register_family, token_mean


class FlowMatchingFamily(DiffusionFamily):
    """Shared by flow-matching pipelines: velocity prediction, sigmas/timesteps from the pipeline's scheduler."""

    denoiser_name = "transformer"

    @property
    def prediction_type(self) -> str:
        return "flow"  # the transformer predicts the velocity v = noise - x0

    @property
    def patch_size(self) -> int:
        return int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self.patch_size

    def default_size(self) -> tuple[int, int]:
        """The pipeline's own default (its transformer's sample_size counts patches, not latent pixels)."""
        size = int(self.pipe.default_sample_size) * self.vae_scale_factor
        return size, size

    def image_seq_len(self, height: int, width: int) -> int:
        """Tokens of one image in the transformer (what dynamic shifting keys on)."""
        _, h, w = self.latent_shape(height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def schedule(self, num_steps: int, height: int | None = None, width: int | None = None):
        """(sigmas, timesteps) of the scheduler's `set_timesteps(num_steps)`, as the pipeline's __call__ sets them."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            c = scheduler.config
            kwargs["mu"] = calculate_shift(self.image_seq_len(*self.image_size(height, width)),
                                           c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas, scheduler.timesteps


@register_family
class SD3Family(FlowMatchingFamily):
    """StableDiffusion3Pipeline (SD3, SD3.5): CLIP-L + CLIP-G (+ T5, optional), pooled_projections, 16 channels."""

    name = "sd3"
    pooled_source = "pooled_projections"
    token_source = "clip_prompt_embeds"

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=None, height=None, width=None, with_uncond=True) -> Conditioning:
        # as the pipeline's __call__ does: no negative prompt = "" (encoded, not zeros); T5 absent = zeros
        embeds, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_uncond, negative_prompt=negative_prompt)
        return Conditioning(embeds, neg if with_uncond else None, pooled, neg_pooled if with_uncond else None)

    def branch_kwargs(self, cond: Conditioning, which: str) -> dict:
        embeds, pooled = cond.pick(which)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def forward(self, z: torch.Tensor, t, kwargs: dict) -> torch.Tensor:
        t = torch.as_tensor(t, device=z.device)
        return self.denoiser(hidden_states=z, timestep=t.expand(z.shape[0]), **kwargs, return_dict=False)[0]

    def _clip_dim(self) -> int:
        return int(self.pipe.text_encoder.config.hidden_size) + int(self.pipe.text_encoder_2.config.hidden_size)

    def pooled_dim(self) -> int:
        return int(self.pipe.text_encoder.config.projection_dim) + int(self.pipe.text_encoder_2.config.projection_dim)

    def token_dim(self) -> int:
        return self._clip_dim()

    def token_embedding(self, prompts, cond: Conditioning) -> torch.Tensor:
        # the CLIP part of prompt_embeds: its first tokenizer_max_length rows, before the zero padding to T5's width
        clip = cond.cond_embeds[:, : self.pipe.tokenizer_max_length, : self._clip_dim()]  # (B, 77, 2048)
        return token_mean(clip, self.pipe.tokenizer, prompts)
