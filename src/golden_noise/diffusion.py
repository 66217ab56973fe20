"""Diffusion-model plumbing shared by every stage: loading a pipeline, prompt conditioning,
classifier-free-guided noise prediction, seeded initial noise and sampling from given latents.

SDXL is the target. The seam for other pipelines is `encode_prompts`: SD 1.5/2.1-style pipelines
would return a `Conditioning` with `pooled=None` and `time_ids=None`, and everything downstream
(CFG, the golden step, sampling) works unchanged.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .errors import UserError, one_line
from .io import looks_local
from .runtime import get_logger, model_dtype, resolve_device, resolve_dtype

logger = get_logger(__name__)

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
SCHEDULERS = ("default", "ddim", "dpmsolver++", "euler")


def sdxl_scheduler_config() -> dict:
    """SDXL base 1.0's scheduler config (scaled-linear betas, leading spacing, offset 1), as DDIM."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=False,
                prediction_type="epsilon")


def load_pipeline(base_model_id: str, revision: str | None = None, variant: str | None = None,
                  dtype: str | torch.dtype = "float32", device: str | torch.device = "auto", cpu_offload: bool = False,
                  vae_slicing: bool = False, vae_tiling: bool = False):
    """Load a diffusers text-to-image pipeline from a hub id or a local directory, on `device` in `dtype`
    ('auto': float16 on CUDA, float32 elsewhere).

    `cpu_offload` keeps each model on the CPU until it runs (diffusers' enable_model_cpu_offload: needs a GPU);
    `vae_slicing` / `vae_tiling` decode a batch image by image / in tiles (less memory)."""
    from diffusers import DiffusionPipeline

    device = device if isinstance(device, torch.device) else resolve_device(device)
    torch_dtype = resolve_dtype(model_dtype(dtype, device) if isinstance(dtype, str) else dtype)
    local = Path(base_model_id).expanduser()
    is_local = looks_local(base_model_id)
    if is_local and not (local / "model_index.json").is_file():
        raise UserError(f"--base_model_id {base_model_id}: no diffusers pipeline there (model_index.json missing); "
                        "pass a pipeline directory or a hub id like " + DEFAULT_MODEL_ID)
    if cpu_offload and device.type != "cuda":
        raise UserError(f"--enable_model_cpu_offload moves each model to the GPU when it runs, but the device is "
                        f"{device}: drop the flag or run on a CUDA GPU")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local) if is_local else base_model_id, revision=revision,
                                                 variant=variant, **{dtype_keyword(): torch_dtype})
    except Exception as e:  # hub errors come in many types (OSError, HfHubHTTPError, ValueError, ...)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("HF_HUB_OFFLINE is set, so only models already in the cache load: unset it or pass a local path"
                if offline else "check the id, --revision and --variant, your network and `huggingface-cli login`; "
                "set HF_HUB_OFFLINE=1 to use the local cache only")
        raise UserError(f"cannot load --base_model_id {base_model_id!r}: {one_line(e)} ({hint})") from None
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dtype_keyword(version: str | None = None) -> str:
    """The `from_pretrained` keyword that sets the dtype in the installed diffusers (or `version`).

    diffusers 0.40 renamed `torch_dtype` to `dtype` (`torch_dtype` still works there, with a FutureWarning);
    before 0.40, `dtype=` is ignored with a logged warning and the weights load in float32."""
    if version is None:
        import diffusers

        version = diffusers.__version__
    from packaging.version import Version

    return "dtype" if Version(version).release[:2] >= (0, 40) else "torch_dtype"


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """(C, H/8, W/8) for an image of `height` x `width` (default: the UNet's native size)."""
    height, width = image_size(pipe, height, width)
    f = pipe.vae_scale_factor
    return (pipe.unet.config.in_channels, height // f, width // f)


def image_size(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """Validate (height, width), defaulting to `unet.sample_size * vae_scale_factor`."""
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default, width or default
    multiple = max(8, pipe.vae_scale_factor)  # diffusers' SDXL pipeline requires multiples of 8
    for name, value in (("--height", height), ("--width", width)):
        if value <= 0 or value % multiple:
            raise UserError(f"{name} {value} must be a positive multiple of {multiple}")
    return height, width


@dataclass
class Conditioning:
    """Per-sample UNet conditioning for both CFG branches.

    cond_embeds/uncond_embeds: (B, 77, D) token embeddings; cond_pooled/uncond_pooled: (B, P) pooled text
    embeddings (SDXL) or None; time_ids: (B, 6) SDXL micro-conditioning or None.
    """

    cond_embeds: torch.Tensor
    uncond_embeds: torch.Tensor | None = None
    cond_pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.cond_embeds.shape[0]

    def branch(self, which: str) -> dict:
        """UNet keyword arguments for the 'cond' or 'uncond' branch."""
        embeds = self.cond_embeds if which == "cond" else self.uncond_embeds
        pooled = self.cond_pooled if which == "cond" else self.uncond_pooled
        if embeds is None:
            raise ValueError("this Conditioning was encoded without the unconditional branch")
        kwargs = {"encoder_hidden_states": embeds}
        if self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids}
        return kwargs


def sdxl_time_ids(height: int, width: int, batch: int, device=None, dtype=None) -> torch.Tensor:
    """SDXL added conditioning [orig_h, orig_w, crop_top, crop_left, target_h, target_w] -> (B, 6)."""
    row = torch.tensor([height, width, 0, 0, height, width], dtype=dtype or torch.float32, device=device)
    return row.expand(batch, 6).clone()


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                   height: int | None = None, width: int | None = None, with_uncond: bool = True) -> Conditioning:
    """Encode a batch of prompts (and negatives when `with_uncond`) into a `Conditioning`."""
    prompts = list(prompts)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "tokenizer_2"):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1,
            do_classifier_free_guidance=with_uncond, negative_prompt=negative_prompt)
        height, width = image_size(pipe, height, width)
        time_ids = sdxl_time_ids(height, width, len(prompts), device=device, dtype=embeds.dtype)
        return Conditioning(embeds, neg if with_uncond else None, pooled, neg_pooled if with_uncond else None,
                            time_ids)
    embeds, neg = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=with_uncond, negative_prompt=negative_prompt)
    return Conditioning(embeds, neg if with_uncond else None)


def count_long_prompts(pipe, prompts: Sequence[str]) -> int:
    """How many prompts exceed the CLIP window (tokenizer.model_max_length, 77) and will be truncated."""
    tok = pipe.tokenizer
    ids = tok(list(prompts), truncation=False, padding=False)["input_ids"]
    return sum(len(i) > tok.model_max_length for i in ids)


# The prompt representation the RNN is conditioned on (stored by stage 2, recomputed at inference):
#   pooled            text_encoder_2's projected pooled embedding (SDXL: 1280)
#   mean_token        the UNet's token embeddings (prompt_embeds) averaged over the prompt's tokens (SDXL: 2048)
#   pooled+mean_token both, concatenated (SDXL: 3328)
# A pooled embedding need not encode every attribute linearly (in the toy world it loses the position words);
# the token mean keeps each word's contribution. "auto" is pooled where there is one, else mean_token.
TEXT_EMBEDDINGS = ("auto", "pooled", "mean_token", "pooled+mean_token")


def resolve_text_embedding(pipe, kind: str = "auto") -> dict:
    """{"kind", "dim", "source"} of the text embedding `kind` for `pipe` (run_config's text_embedding)."""
    has_pooled = getattr(pipe, "text_encoder_2", None) is not None
    if kind == "auto":
        kind = "pooled" if has_pooled else "mean_token"
    if kind not in TEXT_EMBEDDINGS[1:]:
        raise UserError(f"--text_embedding {kind!r}: choose one of {', '.join(TEXT_EMBEDDINGS)}")
    if "pooled" in kind and not has_pooled:
        raise UserError(f"--text_embedding {kind}: this pipeline has no pooled embedding (no text_encoder_2); "
                        "use mean_token")
    pooled_dim = int(pipe.text_encoder_2.config.projection_dim) if has_pooled else 0
    token_dim = sum(int(te.config.hidden_size) for te in (getattr(pipe, "text_encoder", None),
                                                         getattr(pipe, "text_encoder_2", None)) if te is not None)
    if kind == "pooled":
        return {"kind": kind, "dim": pooled_dim, "source": "text_encoder_2"}
    if kind == "mean_token":
        return {"kind": kind, "dim": token_dim, "source": "prompt_embeds"}
    return {"kind": kind, "dim": pooled_dim + token_dim, "source": "text_encoder_2+prompt_embeds"}


def text_embedding(pipe, prompts: Sequence[str], cond: Conditioning, kind: str) -> torch.Tensor:
    """The RNN's text input for `prompts` (B, P) float32, from their `Conditioning` (see TEXT_EMBEDDINGS)."""
    kind = resolve_text_embedding(pipe, kind)["kind"]
    parts = []
    if "pooled" in kind:
        parts.append(cond.cond_pooled.float())
    if "mean_token" in kind:
        tok = pipe.tokenizer
        mask = tok(list(prompts), padding="max_length", max_length=cond.cond_embeds.shape[1], truncation=True,
                   return_tensors="pt").attention_mask.to(cond.cond_embeds.device, torch.float32)  # (B, 77)
        embeds = cond.cond_embeds.float()
        parts.append((embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(parts, dim=1)


class UNetCounter:
    """Counts UNet evaluations (one per sample per CFG branch) around a UNet's forward."""

    def __init__(self):
        self.evaluations = 0
        self.calls = 0


def predict_noise(unet, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning, guidance_scale: float,
                  counter: UNetCounter | None = None) -> torch.Tensor:
    """Classifier-free-guided noise prediction eps_u + w (eps_c - eps_u), computed in float32.

    Only the branches the scale needs are evaluated: w = 1 is the conditional branch alone, w = 0 the
    unconditional one; otherwise both run in one UNet call of batch 2B.
    """
    dtype = unet.dtype
    xin = x.to(dtype)
    if guidance_scale in (0.0, 1.0):
        branch = "cond" if guidance_scale == 1.0 else "uncond"
        eps = unet(xin, t, **cond.branch(branch), return_dict=False)[0].float()
        if counter is not None:
            counter.calls += 1
            counter.evaluations += x.shape[0]
        return eps
    u, c = cond.branch("uncond"), cond.branch("cond")
    kwargs = {"encoder_hidden_states": torch.cat([u["encoder_hidden_states"], c["encoder_hidden_states"]])}
    if "added_cond_kwargs" in c:
        kwargs["added_cond_kwargs"] = {k: torch.cat([u["added_cond_kwargs"][k], c["added_cond_kwargs"][k]])
                                       for k in c["added_cond_kwargs"]}
    eps_u, eps_c = unet(torch.cat([xin, xin]), t, **kwargs, return_dict=False)[0].float().chunk(2)
    if counter is not None:
        counter.calls += 1
        counter.evaluations += 2 * x.shape[0]
    return eps_u + guidance_scale * (eps_c - eps_u)


def optimize_unet(unet, channels_last: bool = False, compile_unet: bool = False, mode: str | None = None,
                  backend: str = "inductor"):
    """Speed options for UNet forwards, in place: channels_last memory format and/or `torch.compile`.

    `nn.Module.compile` keeps the module object (and `unet.dtype`, `.config`, hooks, the pipeline's reference);
    shapes are static (`dynamic=False`): one graph per batch shape, i.e. B and 2B with CFG, plus the last batch.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile(mode=mode, backend=backend, dynamic=False)
    return unet


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit-variance initial noise (B, *shape), sample i drawn from its own `torch.Generator().manual_seed(seeds[i])`.

    A sample's noise depends on its seed only (not batch size, process count or resume point), and equals
    the latents `pipe(..., generator=torch.Generator().manual_seed(seed))` draws in float32.
    """
    noise = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
             for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def set_scheduler(pipe, name: str = "default"):
    """Swap the pipeline's sampling scheduler: its own ('default'), DDIM, DPM-Solver++ or Euler."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if not hasattr(pipe, "_default_scheduler"):
        pipe._default_scheduler = pipe.scheduler
    config = pipe._default_scheduler.config
    pipe.scheduler = {
        "default": lambda: pipe._default_scheduler,
        "ddim": lambda: DDIMScheduler.from_config(config),
        "dpmsolver++": lambda: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
        "euler": lambda: EulerDiscreteScheduler.from_config(config),
    }[name]()
    return pipe


@torch.no_grad()
def sample_images(pipe, prompts: Sequence[str], latents: torch.Tensor, num_inference_steps: int = 30,
                  guidance_scale: float = 5.0, negative_prompt: str | Sequence[str] | None = None,
                  height: int | None = None, width: int | None = None, output_type: str = "pil"):
    """Sample images from given unit-variance initial latents (B, C, h, w); the pipeline scales them
    by its scheduler's init_noise_sigma."""
    height, width = image_size(pipe, height, width)
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * len(prompts)
    out = pipe(prompt=list(prompts), negative_prompt=negative_prompt, latents=latents.to(pipe.device, pipe.dtype),
               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
               output_type=output_type)
    return out.images
