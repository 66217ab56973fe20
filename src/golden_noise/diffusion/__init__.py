"""Diffusion-model plumbing shared by every stage, behind one seam: a pipeline family (diffusion.base) per kind of
pipeline — SDXL and SD 1.5/2.1 (UNet, epsilon or v-prediction; diffusion.unet), SD3/SD3.5 (flow matching;
diffusion.flow) and FLUX.1 [dev] (guidance-distilled flow matching; diffusion.flux) — chosen from the loaded
pipeline by `family_of(pipe)`. The functions below take a pipeline and ask its family, so a stage never branches on
the model: loading, prompt conditioning, guided prediction, seeded initial noise, sampling from given latents and
the RNN's text embedding.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import (FAMILIES, TEXT_EMBEDDINGS, Conditioning, DiffusionFamily, ModelCounter, family_names,
                   family_of, fingerprint, guidance_branches, guided_prediction, register_family, seeded_noise)
from .loading import (DEFAULT_MODEL_ID, SCHEDULERS, TIMESTEP_SPACINGS, dtype_keyword, load_pipeline, optimize_unet,
                      place_pipeline, set_scheduler)
# importing a family module registers its families (SDXL is checked before SD; SD3 and FLUX match by transformer)
from .unet import SDFamily, SDXLFamily, sdxl_scheduler_config, sdxl_time_ids
from .flow import FlowMatchingFamily, SD3Family
from .flux import FluxFamily

__all__ = ["DEFAULT_MODEL_ID", "FAMILIES", "SCHEDULERS", "TEXT_EMBEDDINGS", "TIMESTEP_SPACINGS", "Conditioning",
           "DiffusionFamily", "FlowMatchingFamily", "FluxFamily", "ModelCounter", "SD3Family", "SDFamily",
           "SDXLFamily", "count_long_prompts", "dtype_keyword", "encode_prompts", "family_names",
           "family_of", "fingerprint", "guidance_branches", "guided_prediction", "image_size", "latent_shape",
           "load_pipeline", "optimize_unet", "place_pipeline", "register_family",
           "resolve_text_embedding", "sample_images", "sdxl_scheduler_config", "sdxl_time_ids", "seeded_noise",
           "set_scheduler", "text_embedding"]


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(C, H/f, W/f) for an image of `height` x `width` (default: the model's native size), never packed."""
    return family_of(pipe).latent_shape(height, width)


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Validate (height, width), defaulting to the model's native size."""
    return family_of(pipe).image_size(height, width)


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                   height: int | None = None, width: int | None = None, with_uncond: bool = True) -> Conditioning:
    """Encode a batch of prompts (and negatives when `with_uncond`) into a `Conditioning`."""
    prompts = list(prompts)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    return family_of(pipe).encode(prompts, negative_prompt, height, width, with_uncond)


def count_long_prompts(pipe, prompts: Sequence[str]) -> int:
    """How many prompts exceed the CLIP window (tokenizer.model_max_length, 77) and will be truncated."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), truncation=False, padding=False)["input_ids"]
    return sum(len(i) > tok.model_max_length for i in ids)


def resolve_text_embedding(pipe, kind: str = "auto") -> dict:
    """{"kind", "dim", "source"} of the text embedding `kind` for `pipe` (run_config's text_embedding)."""
    return family_of(pipe).text_embedding_spec(kind)


def text_embedding(pipe, prompts: Sequence[str], cond: Conditioning, kind: str) -> torch.Tensor:
    """The RNN's text input for `prompts` (B, P) float32, from their `Conditioning` (see TEXT_EMBEDDINGS)."""
    return family_of(pipe).text_embedding(prompts, cond, kind)


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], latents: torch.Tensor, num_inference_steps: int = 30,
                  guidance_scale: float = 5.0, negative_prompt: str | Sequence[str] | None = None,
                  height: int | None = None, width: int | None = None, output_type: str = "pil"):
    """Sample images from given unit-variance initial latents (B, C, h, w); the pipeline scales them by its
    scheduler's init_noise_sigma (UNet families) or takes them as they are (flow matching; FLUX packs them)."""
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    return family_of(pipe).sample(prompts, latents, num_inference_steps, guidance_scale, negative_prompt, height,
                                  width, output_type)
