"""What stages 4 and 5 (and the sweep) share: which pipeline to load, which sampler turns the noise into images
(the same pipeline, or a separate one of the same latent space: another pipeline, a swapped UNet, a fused LoRA,
with its own scheduler and step count), and how both are resolved against the RNN export (model id, dtype, image
size, rollout length, latent space) into the values recorded in their settings JSON."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..cli import add_dataclass_arguments, check_fields, dataclass_from_args, setting
from ..diffusion import (DEFAULT_MODEL_ID, SCHEDULERS, TIMESTEP_SPACINGS, family_of, image_size, latent_shape,
                         load_pipeline)
from ..errors import UserError
from ..runtime import get_logger, model_dtype
from .api import DEFAULT_NUM_GEN_STEPS, GoldenNoise
from ..golden import GoldenConfig
from ..methods import LEARNED, ONE_STEP
from .sampler import build_sampler

logger = get_logger(__name__)

PREDICT_VARIANCE_HELP = ("the seed's flag: check that the export was trained with predict_variance (the export's "
                         "config decides the architecture)")


@dataclass
class PipelineSpec:
    """Which diffusers pipeline to load, and how (the fields are named like golden_noise.cli's pipeline flags; their
    `rerun` keys are what a run's settings record of them, resolved)."""

    base_model_id: str | None = setting(None, rerun="base_model_id_used", loaded="pipeline_class")  # None: the
    # one the RNN was trained with, else diffusion.DEFAULT_MODEL_ID
    revision: str | None = setting(None, rerun=True)
    variant: str | None = setting(None, rerun=True)
    dtype: str = setting("auto", rerun="dtype_used")  # auto: float16 on CUDA, float32 elsewhere (runtime.model_dtype)
    device: str = setting("auto", rerun="device_type")
    enable_model_cpu_offload: bool = False
    enable_vae_slicing: bool = setting(False, rerun=True)
    enable_vae_tiling: bool = setting(False, rerun=True)


@dataclass
class SamplingConfig:
    """The sampler: how an image is sampled from its initial latents (the sampling flags of stages 4 and 5 and the
    sweep; add them with `add_sampling_arguments`). The golden noise is always made by the base pipeline (the RNN's
    text embedding, the oracle); `sampling_model_id` / `sampling_unet` / `sampling_lora` make a separate sampler."""

    num_inference_steps: int = setting(30, "sampling steps of the sampler", min=1, rerun=True)
    guidance_scale: float = setting(5.5, "classifier-free guidance of the sampling; diffusers applies none for a "
                                    "scale <= 1 (as 1.0); FLUX.1 [dev]: the value of its guidance embedding", min=0,
                                    rerun=True)
    negative_prompt: str | None = setting(None, "negative prompt of the sampling", rerun=True)
    scheduler: str = setting("default", "sampling scheduler: the sampler's own ('default'), or for UNet models DDIM, "
                             "DPM-Solver++, Euler, Euler ancestral, LCM (LCM-LoRA) or TCD (Hyper-SD), built from the "
                             "sampler's scheduler config", choices=SCHEDULERS, rerun=True, loaded="scheduler_class")
    timestep_spacing: str | None = setting(None, "override the sampling scheduler's timestep spacing (trailing for "
                                           "SDXL-Lightning/Turbo few-step sampling; default: the scheduler config's)",
                                           choices=TIMESTEP_SPACINGS, rerun=True)
    height: int | None = setting(None, "image height in px (default: the RNN's training resolution, else the model's "
                                 "default size)", loaded=("height_used", "latent_shape"))
    width: int | None = setting(None, "image width in px (default: the RNN's training resolution, else the model's "
                                "default size)", loaded="width_used")
    sampling_model_id: str | None = setting(None, "separate sampler: another diffusers pipeline (hub id or local dir) "
                                            "of the base model's latent space that samples the images, e.g. "
                                            "stabilityai/sdxl-turbo for an SDXL-trained RNN (default: the base "
                                            "pipeline)", rerun=True)
    sampling_unet: str | None = setting(None, "separate sampler: a UNet swapped into the sampler, as a diffusers UNet "
                                        "folder or hub repo, or a single .safetensors state dict (a local file, or "
                                        "hub 'org/repo/file.safetensors', e.g. "
                                        "ByteDance/SDXL-Lightning/sdxl_lightning_4step_unet.safetensors)", rerun=True)
    sampling_lora: str | None = setting(None, "separate sampler: LoRA weights fused into a copy of the sampler's "
                                        "denoiser (a .safetensors file, a folder or hub repo holding "
                                        "pytorch_lora_weights.safetensors, or 'org/repo/file.safetensors'), e.g. "
                                        "latent-consistency/lcm-lora-sdxl; needs peft", rerun=True)
    sampling_lora_scale: float | None = setting(None, "weight of --sampling_lora when fused (default 1.0)",
                                                rerun=True)

    @property
    def separate(self) -> bool:
        """Whether the images are sampled by another pipeline than the base one."""
        return bool(self.sampling_model_id or self.sampling_unet or self.sampling_lora)

    def check(self) -> None:
        """UserError naming the flag of a value no run can use."""
        check_fields(self)
        if self.sampling_lora_scale is not None and not self.sampling_lora:
            raise UserError("--sampling_lora_scale is the weight of --sampling_lora: pass --sampling_lora too")

    def log_guidance(self) -> None:
        """Say when --guidance_scale turns classifier-free guidance off (diffusers runs none for a scale <= 1); the
        settings record what the sampler really applies (sampling_record, from the sampler's family)."""
        if self.guidance_scale <= 1:
            logger.info("--guidance_scale %g <= 1: diffusers applies no classifier-free guidance; sampling uses the "
                        "conditional prediction alone%s", self.guidance_scale,
                        " (the same images as --guidance_scale 1)" if self.guidance_scale < 1 else "")


def add_sampling_arguments(group) -> list[str]:
    """The sampler's flags (every SamplingConfig field: steps, guidance, scheduler, size, separate sampler), for
    stages 4 and 5 and the sweep; read them back with `sampling_from_args`."""
    return add_dataclass_arguments(group, SamplingConfig)


def sampling_from_args(args) -> SamplingConfig:
    """The SamplingConfig the flags of `add_sampling_arguments` describe."""
    return dataclass_from_args(SamplingConfig, args)


def add_golden_override_arguments(group, helps: dict[str, str] | None = None) -> list[str]:
    """The oracle's GoldenConfig flags (stage 5, the sweep), each defaulting to None: the RNN's training data
    decides, else GoldenConfig's own default; read the given ones back with `golden_overrides_from_args`."""
    none = {f.name: None for f in dataclasses.fields(GoldenConfig)}
    return add_dataclass_arguments(group, GoldenConfig, defaults=none, helps=helps)


def golden_overrides_from_args(args) -> dict:
    """{GoldenConfig field: value} of the flags `add_golden_override_arguments` added that were given."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(GoldenConfig)
            if getattr(args, f.name) is not None}


def flat_record(job) -> dict:
    """A job dataclass as a flat dict: the fields of nested dataclasses (sampling, pipeline) lifted to the top."""
    out = {}
    for f in dataclasses.fields(job):
        value = getattr(job, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flat_record(value))
        else:
            out[f.name] = value
    return out


def load_golden_noise(path: str | None, device, predict_variance: bool = False,
                      model_type: str = "NoiseSequenceRNN_v3", flag: str = "--rnn_weights_path") -> GoldenNoise | None:
    """The export at `path` (None: none) of a `model_type` model (golden_noise.model.MODEL_TYPES; another type is a
    UserError naming `flag`), in float32 on `device`."""
    if not path:
        if predict_variance:
            raise UserError("--predict_variance checks the RNN export: pass --rnn_weights_path too")
        return None
    return GoldenNoise.from_pretrained(path, device=device, predict_variance=predict_variance, model_type=model_type,
                                       flag=flag)


def load_one_step_models(methods, paths: dict[str, str | None], device, loaded: dict | None = None) -> dict:
    """{method: GoldenNoise} of the one-step learned methods (direct, npnet) among `methods`, from their export
    flags (`paths`: {method: path}); `loaded` ones are taken as they are (the sweep loads each once)."""
    out = {}
    for method in ONE_STEP:
        if method in methods:
            model_type, flag = LEARNED[method]
            out[method] = (loaded or {}).get(method) or load_golden_noise(paths[method], device, model_type=model_type,
                                                                          flag=f"--{flag}")
    return out


RNN_RECORD_KEYS = ("rnn_weights_file", "rnn_sha256", "rnn_config_sha256", "rnn_model_config", "rnn_run_config")


def learned_keys(method: str) -> tuple[str, ...]:
    """RNN_RECORD_KEYS's names for a one-step method: {method}_weights_file, _sha256, _config_sha256, ..."""
    return tuple(f"{method}_{k[len('rnn_'):]}" for k in RNN_RECORD_KEYS)


def learned_record(method: str, gn: GoldenNoise | None) -> dict:
    """rnn_record of a one-step method's export (direct, npnet), under `learned_keys(method)`."""
    return dict(zip(learned_keys(method), rnn_record(gn).values()))


def rnn_record(gn: GoldenNoise | None) -> dict:
    """What identifies the RNN export in a settings JSON: its weights file, the weights' sha256 and the config's
    (the export's identity: a rerun with another or an edited export differs in one of them), and its configs."""
    if gn is None:
        return dict.fromkeys(RNN_RECORD_KEYS)
    identity = gn.identity
    return {"rnn_weights_file": str(gn.export.files.weights), "rnn_sha256": identity["weights_sha256"],
            "rnn_config_sha256": identity["config_sha256"], "rnn_model_config": gn.model_config,
            "rnn_run_config": gn.run_config}


def resolve_model_id(spec: PipelineSpec, gn: GoldenNoise | None) -> str:
    """--base_model_id, else the pipeline the RNN was trained with, else DEFAULT_MODEL_ID (warns on a mismatch)."""
    trained = gn.run_config.get("base_model_id") if gn is not None else None
    if spec.base_model_id and trained and spec.base_model_id != trained:
        logger.warning("--base_model_id %s differs from %s, which the RNN was trained with", spec.base_model_id,
                       trained)
    return spec.base_model_id or trained or DEFAULT_MODEL_ID


def resolve_num_gen_steps(requested: int | None, gn: GoldenNoise | None) -> int:
    """n: --num_gen_steps (its range checked with the job's fields), else the number of steps of the RNN's training
    sequences, else 10 (warns on a mismatch)."""
    n = requested or (gn.num_steps if gn is not None else None) or DEFAULT_NUM_GEN_STEPS
    if gn is not None and gn.num_steps and n != gn.num_steps:
        logger.warning("--num_gen_steps %d differs from the %d steps of the RNN's training sequences", n, gn.num_steps)
    return n


def pipeline_record(spec: PipelineSpec, gn: GoldenNoise | None, device: torch.device) -> dict:
    """What loading `spec` will resolve to, known before any model is loaded: model id, dtype, device."""
    return {"base_model_id_used": resolve_model_id(spec, gn), "dtype_used": model_dtype(spec.dtype, device),
            "device_used": str(device), "device_type": device.type}


def load_job_pipelines(spec: PipelineSpec, sampling: SamplingConfig, record: dict, device: torch.device):
    """(base pipeline, sampler): the pipeline `record` (from `pipeline_record`) names, which makes the golden noise,
    and the one that samples the images with `sampling`'s scheduler (the same object unless `sampling.separate`)."""
    pipe = load_pipeline(record["base_model_id_used"], revision=spec.revision, variant=spec.variant,
                         dtype=record["dtype_used"], device=device, cpu_offload=spec.enable_model_cpu_offload,
                         vae_slicing=spec.enable_vae_slicing, vae_tiling=spec.enable_vae_tiling)
    sampler = build_sampler(pipe, sampling, record, device, spec.enable_model_cpu_offload, spec.enable_vae_slicing,
                            spec.enable_vae_tiling)
    return pipe, sampler


def sampling_record(pipe, sampling: SamplingConfig, gn: GoldenNoise | None, sampler=None, others=()) -> dict:
    """The image size and latent shape used (--height/--width, else the RNN's (or the first of `others`'), else the
    model's default size), checked against the RNN and the one-step models `others` (and the sampler's latent
    space), the family, the sampling scheduler's class and the guidance the sampler really applies."""
    sampler = sampler if sampler is not None else pipe
    models = [m for m in (gn, *others) if m is not None]
    ref = models[0] if models else None
    height, width = image_size(pipe, sampling.height or (ref.height if ref else None),
                               sampling.width or (ref.width if ref else None))
    for model in models:
        model.check_pipeline(pipe, height, width)
        if sampler is not pipe:
            model.check_sampler(sampler)
    family, sampler_family = family_of(pipe), family_of(sampler)
    out = {"height_used": height, "width_used": width, "latent_shape": list(latent_shape(pipe, height, width)),
           "scheduler_class": type(sampler.scheduler).__name__, "pipeline_class": type(pipe).__name__,
           "family": family.record(), "latent_space": family.latent_space()}
    if sampler is not pipe:
        out["sampler"] = {**sampler_family.record(), "latent_space": sampler_family.latent_space()["fingerprint"]}
    return {**out, **sampler_family.guidance_record(sampling.guidance_scale)}
