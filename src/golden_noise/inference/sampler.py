"""A separate sampler: the pipeline that turns golden noise made by the base model into images — another pipeline
(`--sampling_model_id`, e.g. SDXL-Turbo), the base pipeline with another UNet (`--sampling_unet`, e.g. the
SDXL-Lightning 4-step UNet) and/or a fused LoRA (`--sampling_lora`, e.g. LCM-LoRA) — with its own scheduler.
It shares the base pipeline's modules where it can (text encoders, VAE), never changes the base pipeline (the
golden noise and the oracle still use the base denoiser), and must work in the same latent space."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ..diffusion import family_of, load_pipeline, set_scheduler
from ..errors import UserError, one_line
from ..runtime import get_logger, resolve_dtype
from .api import describe_latent_space

logger = get_logger(__name__)


def hub_file(spec: str, flag: str) -> str | None:
    """A local path for `spec` when it names one file: a local file, or hub 'org/repo/path/file.safetensors'
    (downloaded into the hub cache); None when it names a folder or a repo."""
    path = Path(spec).expanduser()
    if path.is_file():
        return str(path)
    if spec.endswith(".safetensors") and not path.exists() and spec.count("/") >= 2:
        from huggingface_hub import hf_hub_download

        org, repo, filename = spec.split("/", 2)
        try:
            return hf_hub_download(f"{org}/{repo}", filename)
        except Exception as e:  # hub errors come in many types
            raise UserError(f"cannot download {flag} {spec!r}: {one_line(e)}") from None
    if spec.endswith(".safetensors"):
        raise UserError(f"{flag} {spec}: no such file; pass a .safetensors file, a folder or a hub id")
    return None


def load_unet(spec: str, like, device, dtype: torch.dtype):
    """A UNet from a diffusers folder / hub repo (its own config), or a single .safetensors state dict loaded into
    a UNet of `like`'s config (how SDXL-Lightning ships its UNets)."""
    file = hub_file(spec, "--sampling_unet")
    try:
        if file is not None:
            from safetensors.torch import load_file

            unet = type(like).from_config(like.config)
            unet.load_state_dict(load_file(file), strict=True)
        else:
            local = Path(spec).expanduser()
            sub = "unet" if (local / "unet" / "config.json").is_file() else None
            unet = type(like).from_pretrained(str(local) if local.exists() else spec, subfolder=sub)
    except UserError:
        raise
    except Exception as e:  # a wrong state dict, a missing config, a hub error
        raise UserError(f"cannot load --sampling_unet {spec!r}: {one_line(e)} (pass a diffusers UNet folder or hub "
                        "repo, or a .safetensors state dict of this pipeline's UNet)") from None
    return unet.to(device=device, dtype=dtype).eval()


def fuse_lora(sampler, spec: str, scale: float) -> None:
    """Load LoRA weights into the sampler and fuse them (the sampler's denoiser and any text encoder the LoRA
    touches are the sampler's own copies, so the base pipeline stays as it was)."""
    file = hub_file(spec, "--sampling_lora")
    try:
        if file is not None:
            sampler.load_lora_weights(str(Path(file).parent), weight_name=Path(file).name, adapter_name="sampler")
        else:
            sampler.load_lora_weights(spec, adapter_name="sampler")
        sampler.fuse_lora(lora_scale=scale)
        sampler.unload_lora_weights()
    except Exception as e:
        hint = "pip install peft" if "peft" in str(e).lower() else "pass a LoRA .safetensors file, folder or hub id"
        raise UserError(f"cannot load --sampling_lora {spec!r}: {one_line(e)} ({hint})") from None


def build_sampler(pipe, sampling, record: dict, device, cpu_offload: bool = False, vae_slicing: bool = False,
                  vae_tiling: bool = False):
    """The pipeline that samples the images (`pipe` itself unless `sampling.separate`), with its scheduler."""
    if not sampling.separate:
        return set_scheduler(pipe, sampling.scheduler, sampling.timestep_spacing)
    dtype = resolve_dtype(record["dtype_used"])
    if sampling.sampling_model_id:
        sampler = load_pipeline(sampling.sampling_model_id, dtype=dtype, device=device, cpu_offload=cpu_offload,
                                vae_slicing=vae_slicing, vae_tiling=vae_tiling, flag="--sampling_model_id")
    else:
        sampler = type(pipe).from_pipe(pipe)  # shares every module with the base pipeline
        sampler.set_progress_bar_config(disable=True)
    base_family = family_of(pipe)
    check_same_latent_space(pipe, sampler)
    name = family_of(sampler).denoiser_name
    if sampling.sampling_unet:
        if name != "unet":
            raise UserError(f"--sampling_unet swaps a UNet, but {type(sampler).__name__} has a {name}")
        sampler.register_modules(unet=load_unet(sampling.sampling_unet, sampler.unet, device, dtype))
    if sampling.sampling_lora:
        own = {name: copy.deepcopy(getattr(sampler, name))} if getattr(sampler, name) is getattr(pipe, name) else {}
        for te in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(sampler, te, None)
            if module is not None and module is getattr(pipe, te, None):
                own[te] = copy.deepcopy(module)  # a LoRA may touch the text encoders: never the base's
        sampler.register_modules(**own)
        fuse_lora(sampler, sampling.sampling_lora, 1.0 if sampling.sampling_lora_scale is None
                  else sampling.sampling_lora_scale)
    logger.info("separate sampler: %s (%s) for golden noise made by %s", type(sampler).__name__,
                ", ".join(f"{k} {v}" for k, v in (("model", sampling.sampling_model_id), ("unet", sampling.sampling_unet),
                                                  ("lora", sampling.sampling_lora)) if v), base_family.name)
    return set_scheduler(sampler, sampling.scheduler, sampling.timestep_spacing)


def check_same_latent_space(pipe, sampler) -> None:
    """Refuse a sampler whose latent space differs from the base pipeline's, naming both."""
    base, other = family_of(pipe).latent_space(), family_of(sampler).latent_space()
    if base["fingerprint"] != other["fingerprint"]:
        raise UserError(f"--sampling_model_id ({type(sampler).__name__}) works in another latent space than the base "
                        f"model ({type(pipe).__name__}): {describe_latent_space(other)} vs "
                        f"{describe_latent_space(base)}; sample with a pipeline of the base model's latent space")
