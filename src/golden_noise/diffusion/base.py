"""The family interface: one small class per pipeline family (UNet/epsilon, UNet/v-prediction, flow matching, ...)
and the registry that picks the family of a loaded pipeline from its components.

A family knows its latent shape and default image size, encodes prompts into a `Conditioning` for both CFG
branches, evaluates the guided model prediction (only the branches a scale needs, counted in model rows), draws x_T
as the pipeline's own `prepare_latents` does, samples from given latents and defines the RNN's text embedding; its
`predict` and its schedule are what golden.golden_step builds the golden step from. Adding a pipeline family = one
subclass with `matches` + `@register_family`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from ..errors import UserError

# The prompt representation the RNN is conditioned on (stored by stage 2, recomputed at inference):
#   pooled            the family's pooled text embedding (SDXL: text_encoder_2's projection, 1280; SD3: its
#                     pooled_projections, 2048; FLUX: CLIP-L's pooled output, 768; SD 1.5/2.1: none)
#   mean_token        the family's token embeddings averaged over the prompt's own tokens (SDXL: prompt_embeds,
#                     2048; SD 1.5/2.1: prompt_embeds, 768/1024; SD3: its CLIP token embeddings, 2048; FLUX: T5, 4096)
#   pooled+mean_token both, concatenated
#   prompt_embeds     the token embeddings themselves, flattened (L x D: SDXL 77 x 2048): NPNet's text input
# A pooled embedding need not encode every attribute linearly (in the toy world it loses the position words);
# the token mean keeps each word's contribution. "auto" is pooled where there is one, else mean_token.
TEXT_EMBEDDINGS = ("auto", "pooled", "mean_token", "pooled+mean_token", "prompt_embeds")


@dataclass
class Conditioning:
    """Per-sample text conditioning for both CFG branches.

    cond_embeds/uncond_embeds: (B, L, D) token embeddings; cond_pooled/uncond_pooled: (B, P) pooled text
    embeddings or None (SD 1.5/2.1); time_ids: (B, 6) SDXL micro-conditioning or None.
    """

    cond_embeds: torch.Tensor
    uncond_embeds: torch.Tensor | None = None
    cond_pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.cond_embeds.shape[0]

    def pick(self, which: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token embeddings, pooled embedding) of the 'cond' or 'uncond' branch."""
        embeds = self.cond_embeds if which == "cond" else self.uncond_embeds
        pooled = self.cond_pooled if which == "cond" else self.uncond_pooled
        if embeds is None:
            raise ValueError("this Conditioning was encoded without the unconditional branch")
        return embeds, pooled

    def branch(self, which: str) -> dict:
        """UNet keyword arguments for the 'cond' or 'uncond' branch."""
        embeds, pooled = self.pick(which)
        kwargs = {"encoder_hidden_states": embeds}
        if self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": self.time_ids}
        return kwargs


@dataclass
class ModelCounter:
    """Counts denoiser work: `rows` = samples through the denoiser once (a CFG pair is 2 rows), `calls` = forwards."""

    rows: int = 0
    calls: int = 0

    def add(self, rows: int) -> None:
        self.calls += 1
        self.rows += rows



class ModelRows:
    """Counts the rows (batch entries) of every forward of the given denoiser modules while the context is open:
    the cost of whatever runs inside (golden steps, RNN rollouts do not count, sampling through `pipe(...)` does).
    A module given twice (the sampler shares the base pipeline's UNet) is hooked once."""

    def __init__(self, *modules):
        self.modules = list({id(m): m for m in modules if m is not None}.values())
        self.rows, self.calls, self._handles = 0, 0, []

    def _hook(self, module, args, kwargs, output) -> None:
        x = args[0] if args else next(kwargs[k] for k in ("sample", "hidden_states") if k in kwargs)
        self.rows += int(x.shape[0])
        self.calls += 1

    def __enter__(self) -> "ModelRows":
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def guidance_branches(scale: float) -> list[str]:
    """The branches eps_u + w (eps_c - eps_u) needs: w = 1 the conditional alone, w = 0 the unconditional alone."""
    return ["cond"] if scale == 1.0 else ["uncond"] if scale == 0.0 else ["uncond", "cond"]


def _concat(a, b):
    """Concatenate two branches' keyword arguments along the batch (tensors, or dicts of them)."""
    if isinstance(a, dict):
        return {k: _concat(a[k], b[k]) for k in b}
    return torch.cat([a, b])


def guided_prediction(forward: Callable[[torch.Tensor, dict], torch.Tensor], x: torch.Tensor, cond: Conditioning,
                      guidance_scale: float, branch_kwargs: Callable[[Conditioning, str], dict], dtype: torch.dtype,
                      counter: ModelCounter | None = None) -> torch.Tensor:
    """Classifier-free guidance out_u + w (out_c - out_u) in float32, evaluating only the branches w needs; both
    branches run in one forward of batch 2B. `forward(z, kwargs)` -> the model output for z (B', ...)."""
    xin = x.to(dtype)
    branches = guidance_branches(guidance_scale)
    if len(branches) == 1:
        out = forward(xin, branch_kwargs(cond, branches[0])).float()
        if counter is not None:
            counter.add(x.shape[0])
        return out
    kwargs = _concat(branch_kwargs(cond, "uncond"), branch_kwargs(cond, "cond"))
    out_u, out_c = forward(torch.cat([xin, xin]), kwargs).float().chunk(2)
    if counter is not None:
        counter.add(2 * x.shape[0])
    return out_u + guidance_scale * (out_c - out_u)


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Unit-variance initial noise (B, *shape), sample i drawn from its own `torch.Generator().manual_seed(seeds[i])`.

    A sample's noise depends on its seed only (not batch size, process count or resume point), and equals
    the latents `pipe(..., generator=torch.Generator().manual_seed(seed))` draws in float32.
    """
    noise = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=torch.float32)
             for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


def fingerprint(record: dict) -> str:
    """A short sha256 of a JSON-able dict (sorted keys): names a latent space in one token."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_mean(embeds: torch.Tensor, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(B, L, D) token embeddings averaged over each prompt's own tokens (its attention mask) -> (B, D) float32."""
    mask = tokenizer(list(prompts), padding="max_length", max_length=embeds.shape[1], truncation=True,
                     return_tensors="pt").attention_mask.to(embeds.device, torch.float32)  # (B, L)
    embeds = embeds.float()
    return (embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


class DiffusionFamily:
    """One pipeline family behind the interface every stage uses; subclasses fill in the family's specifics."""

    name: ClassVar[str] = "base"
    denoiser_name: ClassVar[str] = "unet"

    def __init__(self, pipe):
        self.pipe = pipe

    @classmethod
    def matches(cls, pipe) -> bool:
        """Whether `pipe` (its class and components) belongs to this family."""
        raise NotImplementedError

    # ------------------------------------------------------------------ identity
    @property
    def denoiser(self):
        """The network the golden step evaluates (the UNet or the transformer)."""
        return getattr(self.pipe, self.denoiser_name)

    @property
    def scheduler_config(self) -> dict:
        """The pipeline's own scheduler config (not a sampling scheduler swapped in by set_scheduler)."""
        return getattr(self.pipe, "_default_scheduler", self.pipe.scheduler).config

    @property
    def prediction_type(self) -> str:
        """epsilon or v_prediction (the golden step: DDIM on `scheduler_config`), flow (Euler on `schedule`)."""
        return self.scheduler_config.get("prediction_type") or "epsilon"

    def record(self) -> dict:
        """run_config's `family`: which family, what its model predicts, which network."""
        return {"name": self.name, "prediction_type": self.prediction_type, "denoiser": self.denoiser_name,
                "pipeline_class": type(self.pipe).__name__}

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs (with model CPU offload its parameters wait on the CPU)."""
        return torch.device(getattr(self.pipe, "_execution_device", None) or self.denoiser.device)

    # ------------------------------------------------------------------ sizes and latent space
    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this."""
        return max(8, self.vae_scale_factor)

    def default_size(self) -> tuple[int, int]:
        size = int(self.denoiser.config.sample_size) * self.vae_scale_factor
        return size, size

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Validate (height, width), defaulting to the model's native size."""
        default_h, default_w = self.default_size()
        height, width = height or default_h, width or default_w
        multiple = self.size_multiple
        for flag, value in (("--height", height), ("--width", width)):
            if value <= 0 or value % multiple:
                raise UserError(f"{flag} {value} must be a positive multiple of {multiple}")
        return height, width

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(C, H/f, W/f) of x_T for an image of `height` x `width` (the RNN's view: never packed)."""
        height, width = self.image_size(height, width)
        f = self.vae_scale_factor
        return (self.latent_channels, height // f, width // f)

    def latent_space(self) -> dict:
        """What makes latents interchangeable between pipelines: family, channels, VAE scale and normalisation."""
        vae = self.pipe.vae.config
        space = {"family": self.name, "latent_channels": self.latent_channels,
                 "vae_scale_factor": self.vae_scale_factor}
        for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"):
            value = vae.get(key)
            space[key] = list(value) if isinstance(value, (list, tuple)) else value
        return {**space, "fingerprint": fingerprint(space)}

    # ------------------------------------------------------------------ noise
    def initial_noise(self, seeds: Sequence[int], shape: Sequence[int], device=None) -> torch.Tensor:
        """x_T (B, *shape) float32, exactly as the pipeline's prepare_latents draws it from one generator per seed."""
        return seeded_noise(seeds, shape, device=device)

    def pipeline_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents (B, C, h, w) in the form `pipe(..., latents=)` takes (identity unless the family packs)."""
        return latents

    # ------------------------------------------------------------------ conditioning and prediction
    def encode(self, prompts: Sequence[str], negative_prompt: Sequence[str] | None = None, height: int | None = None,
               width: int | None = None, with_uncond: bool = True) -> Conditioning:
        raise NotImplementedError

    def branch_kwargs(self, cond: Conditioning, which: str) -> dict:
        """The denoiser's keyword arguments for one CFG branch."""
        return cond.branch(which)

    def forward(self, z: torch.Tensor, t, kwargs: dict) -> torch.Tensor:
        """One denoiser forward at timestep t (as the golden step's schedule gives it)."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor, t, cond: Conditioning, guidance_scale: float,
                counter: ModelCounter | None = None) -> torch.Tensor:
        """The guided prediction (epsilon, v or velocity: the family's own) in float32 (B, C, h, w)."""
        return guided_prediction(lambda z, kw: self.forward(z, t, kw), x, cond, guidance_scale, self.branch_kwargs,
                                 self.denoiser.dtype, counter)

    # ------------------------------------------------------------------ sampling
    def check_negative_prompt(self, negative_prompt) -> None:
        """Refuse a negative prompt where the family has no negative branch."""

    def sample(self, prompts: Sequence[str], latents: torch.Tensor, num_inference_steps: int, guidance_scale: float,
               negative_prompt: Sequence[str] | None = None, height: int | None = None, width: int | None = None,
               output_type: str = "pil"):
        """Images from given unit-variance initial latents (B, C, h, w), through the pipeline's own __call__."""
        self.check_negative_prompt(negative_prompt)
        height, width = self.image_size(height, width)
        latents = self.pipeline_latents(latents.to(self.pipe.device, self.pipe.dtype), height, width)
        out = self.pipe(prompt=list(prompts), negative_prompt=negative_prompt, latents=latents,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                        width=width, output_type=output_type)
        return out.images

    def guidance_record(self, guidance_scale: float) -> dict:
        """The guidance a sampling scale really applies: diffusers runs no CFG for a scale <= 1 (it is then 1.0)."""
        cfg = guidance_scale > 1
        return {"guidance_scale_effective": guidance_scale if cfg else 1.0, "classifier_free_guidance": cfg}

    # ------------------------------------------------------------------ the RNN's text embedding
    pooled_source: ClassVar[str | None] = None
    token_source: ClassVar[str] = "prompt_embeds"

    def pooled_dim(self) -> int | None:
        """Size of the pooled embedding, None when the family has none."""
        return None

    def token_dim(self) -> int:
        raise NotImplementedError

    def pooled_embedding(self, cond: Conditioning) -> torch.Tensor:
        return cond.cond_pooled  # (B, P)

    def token_embedding(self, prompts: Sequence[str], cond: Conditioning) -> torch.Tensor:
        """The token embeddings averaged over the prompt's own tokens (B, D) float32."""
        return token_mean(cond.cond_embeds, self.pipe.tokenizer, prompts)

    def text_embedding_spec(self, kind: str = "auto") -> dict:
        """{"kind", "dim", "source"} of the text embedding `kind` (run_config's text_embedding)."""
        pooled = self.pooled_dim()
        if kind == "auto":
            kind = "pooled" if pooled is not None else "mean_token"
        if kind not in TEXT_EMBEDDINGS[1:]:
            raise UserError(f"--text_embedding {kind!r}: choose one of {', '.join(TEXT_EMBEDDINGS)}")
        if "pooled" in kind and pooled is None:
            raise UserError(f"--text_embedding {kind}: this pipeline has no pooled embedding ({type(self.pipe).__name__}, "
                            f"family {self.name}); use mean_token (or auto)")
        if kind == "pooled":
            return {"kind": kind, "dim": pooled, "source": self.pooled_source}
        if kind == "mean_token":
            return {"kind": kind, "dim": self.token_dim(), "source": self.token_source}
        if kind == "prompt_embeds":
            length = int(self.pipe.tokenizer.model_max_length)
            return {"kind": kind, "dim": length * self.token_dim(), "source": f"{self.token_source} flattened"}
        return {"kind": kind, "dim": pooled + self.token_dim(), "source": f"{self.pooled_source}+{self.token_source}"}

    def text_embedding(self, prompts: Sequence[str], cond: Conditioning, kind: str) -> torch.Tensor:
        """The RNN's text input for `prompts` (B, P) float32, from their `Conditioning` (see TEXT_EMBEDDINGS)."""
        spec = self.text_embedding_spec(kind)
        kind = spec["kind"]
        if kind == "prompt_embeds":
            flat = cond.cond_embeds.float().flatten(1)  # (B, L * D)
            if flat.shape[1] != spec["dim"]:
                raise UserError(f"text embedding prompt_embeds: this pipeline's token embeddings flatten to "
                                f"{flat.shape[1]} values, not {spec['dim']} ({type(self.pipe).__name__})")
            return flat
        parts = []
        if "pooled" in kind:
            parts.append(self.pooled_embedding(cond).float())
        if "mean_token" in kind:
            parts.append(self.token_embedding(prompts, cond))
        return torch.cat(parts, dim=1)


FAMILIES: list[type[DiffusionFamily]] = []  # checked in registration order: the most specific first


def register_family(cls: type[DiffusionFamily]) -> type[DiffusionFamily]:
    """Class decorator: add a family to the registry."""
    FAMILIES.append(cls)
    return cls


def family_of(pipe) -> DiffusionFamily:
    """The family of a loaded pipeline, chosen from its class and components."""
    for cls in FAMILIES:
        if cls.matches(pipe):
            return cls(pipe)
    raise UserError(f"{type(pipe).__name__} is not a supported pipeline family: supported are "
                    f"{', '.join(c.name for c in FAMILIES)} (see the README's 'Model families')")


def family_names() -> list[str]:
    return [c.name for c in FAMILIES]
