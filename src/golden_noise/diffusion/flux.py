"""FLUX.1 [dev]: guidance-distilled flow matching. Guidance is an embedding (one transformer row for any scale), not
two CFG branches, so the golden step's w_l and w_w are the guidance values of its two evaluations (2 rows per step).
The transformer reads latents packed 2x2 into tokens; everything outside the pipeline (x_T, the RNN, the dataset)
uses the unpacked (16, H/8, W/8) latents, packed only on the way into the transformer or the pipeline."""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Conditioning, ModelCounter, register_family, token_mean
from .flow import FlowMatchingFamily


@register_family
class FluxFamily(FlowMatchingFamily):
    """FluxPipeline (FLUX.1 [dev]; [schnell] has no guidance embedding, so w_l and w_w change nothing there)."""

    name = "flux"
    pooled_source = "text_encoder_pooled"
    token_source = "t5_prompt_embeds"

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4  # the transformer sees 2x2 patches of C channels

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    def schedule(self, num_steps: int, height: int | None = None, width: int | None = None):
        """(sigmas, timesteps) as FluxPipeline.__call__ sets them: linspace sigmas, shift mu from the image size."""
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        c = scheduler.config
        sigmas = None if c.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(self.image_seq_len(*self.image_size(height, width)), c.get("base_image_seq_len", 256),
                             c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_steps, None, sigmas=sigmas, mu=mu)
        return scheduler.sigmas, scheduler.timesteps

    @torch.no_grad()
    def encode(self, prompts, negative_prompt=None, height=None, width=None, with_uncond=True) -> Conditioning:
        self.check_negative_prompt(negative_prompt)
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                    num_images_per_prompt=1)
        return Conditioning(embeds, None, pooled, None)  # guidance-distilled: no unconditional branch

    def pack(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C), the pipeline's own packing."""
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z, b, c, h, w)

    def unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h/2 * w/2, 4C) -> (B, C, h, w)."""
        f = self.vae_scale_factor
        return self.pipe._unpack_latents(tokens, h * f, w * f, f)

    def forward_guided(self, z: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
        """v(z, t) with the guidance embedding set to `guidance_scale` (B, C, h, w)."""
        b, _, h, w = z.shape
        t = torch.as_tensor(t, device=z.device)
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, z.device, z.dtype)
        txt_ids = torch.zeros(cond.cond_embeds.shape[1], 3, device=z.device, dtype=z.dtype)
        guidance = (torch.full([1], guidance_scale, device=z.device, dtype=torch.float32).expand(b)
                    if self.guidance_embeds else None)
        out = self.denoiser(hidden_states=self.pack(z), timestep=t.expand(b).to(z.dtype) / 1000, guidance=guidance,
                            pooled_projections=cond.cond_pooled, encoder_hidden_states=cond.cond_embeds,
                            txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return self.unpack(out, h, w)

    def predict(self, x: torch.Tensor, t, cond: Conditioning, guidance_scale: float,
                counter: ModelCounter | None = None) -> torch.Tensor:
        """The velocity at guidance `guidance_scale`: one transformer row per sample, whatever the scale."""
        out = self.forward_guided(x.to(self.denoiser.dtype), t, cond, guidance_scale).float()
        if counter is not None:
            counter.add(x.shape[0])
        return out

    def pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pack(latents)

    def check_negative_prompt(self, negative_prompt) -> None:
        if negative_prompt:
            raise UserError("--negative_prompt: FLUX.1 is guidance-distilled and has no negative branch; drop it")

    def guidance_record(self, guidance_scale: float) -> dict:
        return {"guidance_scale_effective": guidance_scale if self.guidance_embeds else None,
                "classifier_free_guidance": False, "guidance_embedding": self.guidance_embeds}

    def pooled_dim(self) -> int:
        return int(self.pipe.text_encoder.config.hidden_size)  # CLIPTextModel's pooler output

    def token_dim(self) -> int:
        return int(self.pipe.text_encoder_2.config.d_model)

    def token_embedding(self, prompts, cond: Conditioning) -> torch.Tensor:
        return token_mean(cond.cond_embeds, self.pipe.tokenizer_2, prompts)  # (B, 4096): T5 over its own tokens
