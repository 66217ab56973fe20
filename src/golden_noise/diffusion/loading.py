"""Loading a diffusers pipeline (hub id or local dir, dtype, device, memory savers), swapping its sampling
scheduler, and speed options for its denoiser."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UserError, one_line
from ..io import looks_local
from ..runtime import model_dtype, resolve_device, resolve_dtype
from .base import family_of

DEFAULT_MODEL_ID = "stabilityai/stable-diffusion-xl-base-1.0"
# sampling schedulers: the pipeline's own, and UNet-family alternatives (euler + trailing spacing for
# SDXL-Lightning/Turbo, lcm for LCM-LoRA, tcd for Hyper-SD); flow-matching pipelines keep their own
SCHEDULERS = ("default", "ddim", "dpmsolver++", "euler", "euler_ancestral", "lcm", "tcd")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def dtype_keyword(version: str | None = None) -> str:
    """The `from_pretrained` keyword that sets the dtype in the installed diffusers (or `version`).

    diffusers 0.40 renamed `torch_dtype` to `dtype` (`torch_dtype` still works there, with a FutureWarning);
    before 0.40, `dtype=` is ignored with a logged warning and the weights load in float32."""
    if version is None:
        import diffusers

        version = diffusers.__version__
    from packaging.version import Version

    return "dtype" if Version(version).release[:2] >= (0, 40) else "torch_dtype"


def absent_components(path: Path) -> dict:
    """{name: None} for each component a local pipeline directory was saved without (`[null, null]` in
    model_index.json, e.g. SD3 saved with text_encoder_3=None): diffusers loads such a directory only when they
    are passed as None."""
    try:
        index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: None for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
            and all(item is None for item in v)}


def load_pipeline(base_model_id: str, revision: str | None = None, variant: str | None = None,
                  dtype: str | torch.dtype = "float32", device: str | torch.device = "auto", cpu_offload: bool = False,
                  vae_slicing: bool = False, vae_tiling: bool = False, flag: str = "--base_model_id"):
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
        raise UserError(f"{flag} {base_model_id}: no diffusers pipeline there (model_index.json missing); "
                        "pass a pipeline directory or a hub id like " + DEFAULT_MODEL_ID)
    if cpu_offload and device.type != "cuda":
        raise UserError(f"--enable_model_cpu_offload moves each model to the GPU when it runs, but the device is "
                        f"{device}: drop the flag or run on a CUDA GPU")
    absent = absent_components(local) if is_local else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(local) if is_local else base_model_id, revision=revision,
                                                 variant=variant, **absent, **{dtype_keyword(): torch_dtype})
    except Exception as e:  # hub errors come in many types (OSError, HfHubHTTPError, ValueError, ...)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = ("HF_HUB_OFFLINE is set, so only models already in the cache load: unset it or pass a local path"
                if offline else "check the id, --revision and --variant, your network and `huggingface-cli login`; "
                "set HF_HUB_OFFLINE=1 to use the local cache only")
        raise UserError(f"cannot load {flag} {base_model_id!r}: {one_line(e)} ({hint})") from None
    place_pipeline(pipe, device, cpu_offload, vae_slicing, vae_tiling)
    return pipe


def place_pipeline(pipe, device: torch.device, cpu_offload: bool = False, vae_slicing: bool = False,
                   vae_tiling: bool = False):
    """Move a pipeline to `device` (or offload it), set the VAE memory savers and silence its progress bar."""
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


def set_scheduler(pipe, name: str = "default", timestep_spacing: str | None = None):
    """Swap the pipeline's sampling scheduler: its own ('default') or another of SCHEDULERS, optionally with another
    timestep spacing (e.g. 'trailing' for few-step SDXL-Lightning/Turbo sampling). The pipeline's own scheduler
    stays in `pipe._default_scheduler` (the golden step always uses its config)."""
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, LCMScheduler, TCDScheduler)

    if name not in SCHEDULERS:
        raise UserError(f"unknown --scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"unknown --timestep_spacing {timestep_spacing!r}: choose one of "
                        f"{', '.join(TIMESTEP_SPACINGS)}")
    if not hasattr(pipe, "_default_scheduler"):
        pipe._default_scheduler = pipe.scheduler
    family = family_of(pipe)
    if name != "default" and family.denoiser_name != "unet":
        raise UserError(f"--scheduler {name} is a UNet-family scheduler; {type(pipe).__name__} ({family.name}) "
                        "samples with its own flow-matching scheduler: use --scheduler default")
    config = pipe._default_scheduler.config
    overrides = {"timestep_spacing": timestep_spacing} if timestep_spacing else {}
    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler,
               "lcm": LCMScheduler, "tcd": TCDScheduler}
    if name == "default":
        default = pipe._default_scheduler
        pipe.scheduler = type(default).from_config(config, **overrides) if overrides else default
    elif name == "dpmsolver++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", **overrides)
    else:
        pipe.scheduler = classes[name].from_config(config, **overrides)
    return pipe


def optimize_unet(unet, channels_last: bool = False, compile_unet: bool = False, mode: str | None = None,
                  backend: str = "inductor"):
    """Speed options for denoiser forwards, in place: channels_last memory format and/or `torch.compile`.

    `nn.Module.compile` keeps the module object (and `unet.dtype`, `.config`, hooks, the pipeline's reference);
    shapes are static (`dynamic=False`): one graph per batch shape, i.e. B and 2B with CFG, plus the last batch.
    """
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile_unet:
        unet.compile(mode=mode, backend=backend, dynamic=False)
    return unet
