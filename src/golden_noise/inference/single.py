"""Stage 4: the golden-noise image of one prompt and seed (plus standard/oracle images on request)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..cli import SEED_RULES, check_fields
from ..diffusion import family_of, sample_images
from ..errors import UserError
from ..io import atomic_save_image, atomic_torch_save, atomic_write_json
from ..prompts import normalize_prompt
from ..runs import check_writable_dir
from ..runtime import get_logger, package_versions, resolve_device
from .api import GoldenNoise, _sync, golden_config_from, oracle_noise
from .config import (PREDICT_VARIANCE_HELP, PipelineSpec, SamplingConfig, flat_record, load_golden_noise,
                     load_job_pipelines, pipeline_record, resolve_num_gen_steps, rnn_record, sampling_record)

logger = get_logger(__name__)


@dataclass
class SingleJob:
    """One prompt and one seed: what stage 4 makes and where (the CLI fills it from its flags)."""

    rnn_weights_path: str
    prompt: str
    output_dir: str = field(default="./inference_output",
                            metadata={"help": "folder for the images, noises and settings"})
    output_name: str | None = field(default=None, metadata={
        "help": "file-name stem of the outputs, a plain name without / or \\ (default: a slug of the prompt plus "
                "the seed)"})
    seed: int = field(default=42, metadata={"help": "seed of the initial noise x_T", **SEED_RULES})
    num_gen_steps: int | None = field(default=None, metadata={
        "help": "RNN rollout length n (default: num_steps of the training data; another value warns)", "min": 1})
    generate_standard: bool = field(default=False, metadata={
        "help": "also sample the standard image from x_T itself, same seed and settings"})
    generate_oracle: bool = field(default=False, metadata={
        "help": "also sample from the oracle: the real golden step applied n times to x_T (its parameters come "
                "from the RNN's training data)"})
    sample_noise: bool = field(default=False, metadata={
        "help": "draw from the RNN's predicted Gaussian (seeded by --seed) instead of taking its mean; needs an "
                "export trained with predict_variance"})
    save_noise: bool = field(default=False, metadata={
        "help": "save x_T and the golden noise(s) as .pt tensors (C, H, W)"})
    predict_variance: bool = field(default=False, metadata={"help": PREDICT_VARIANCE_HELP})
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)


def prompt_slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe stem from a prompt: lower-case words joined by '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def check_single(job: SingleJob) -> str:
    """Validate the job's flags before any work; returns the normalised prompt."""
    text = normalize_prompt(job.prompt)
    if not text:
        raise UserError("--prompt is empty: pass a text prompt")
    name = job.output_name
    if name is not None and (not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0")):
        raise UserError(f"--output_name {name!r} is not a plain file name: it names the outputs inside --output_dir "
                        "and may not hold / or \\ or be empty, '.' or '..'; choose the folder with --output_dir")
    check_fields(job)
    job.sampling.check()
    return text


def run_single(job: SingleJob) -> dict:
    """Stage 4: write the images, noises and `{stem}_settings.json` of `job`; returns the settings dict."""
    text = check_single(job)
    out = check_writable_dir(job.output_dir, "--output_dir")  # before any model is loaded
    device = resolve_device(job.pipeline.device)
    gn = load_golden_noise(job.rnn_weights_path, device, job.predict_variance)
    if job.sample_noise and not gn.model_config.get("predict_variance", False):
        raise UserError("--sample_noise needs an export trained with predict_variance; this one predicts the "
                        "mean only: drop --sample_noise")
    resolved = {"prompt_used": text, **pipeline_record(job.pipeline, gn, device),
                "num_gen_steps_used": resolve_num_gen_steps(job.num_gen_steps, gn)}
    job.sampling.log_guidance()
    pipe, sampler = load_job_pipelines(job.pipeline, job.sampling, resolved, device)
    resolved.update(sampling_record(pipe, job.sampling, gn, sampler))

    latents, timings, golden = golden_latents(job, text, gn, pipe, resolved)
    stem = job.output_name or f"{prompt_slug(text)}_seed{job.seed}"
    files = save_outputs(job, text, sampler, latents, timings, resolved, out, stem)

    settings = {**flat_record(job), **resolved, "oracle_golden": golden.to_dict() if golden else None,
                "files": files, "timings": timings, **rnn_record(gn),
                "versions": package_versions()}
    atomic_write_json(out / f"{stem}_settings.json", settings)
    logger.info("rollout %.3fs (%d steps) = %.1f%% of sampling %.3fs; settings in %s", timings["rollout_seconds"],
                resolved["num_gen_steps_used"], 100 * timings["rollout_over_sampling"],
                timings["gnsnet_sampling_seconds"], out / f"{stem}_settings.json")
    return settings


def golden_latents(job: SingleJob, text: str, gn: GoldenNoise, pipe, resolved: dict):
    """x_T of the seed and the latents of each asked method ({method: (1, C, H, W)}), their timings, and the
    oracle's golden-step config (None without --generate_oracle)."""
    n = resolved["num_gen_steps_used"]
    x_T = family_of(pipe).initial_noise([job.seed], resolved["latent_shape"])  # (1, C, H, W) float32
    generator = torch.Generator(device=gn.device).manual_seed(job.seed) if job.sample_noise else None
    t0 = time.perf_counter()
    text_embed = gn.text_embeddings([text], pipe)  # (1, P)
    _sync(gn.device)
    t1 = time.perf_counter()
    golden = gn.rollout(x_T, text_embed, n, sample=job.sample_noise, generator=generator)[:, -1]  # (1, C, H, W)
    _sync(gn.device)
    timings = {"text_embedding_seconds": t1 - t0, "rollout_seconds": time.perf_counter() - t1}
    latents = {"gnsnet": golden, "source": x_T}
    config = None
    if job.generate_oracle:
        config = golden_config_from(gn.run_config)
        t0 = time.perf_counter()
        latents["oracle"] = oracle_noise(pipe, [text], x_T, n, config, resolved["height_used"],
                                         resolved["width_used"])
        _sync(family_of(pipe).device)
        timings["oracle_seconds"] = time.perf_counter() - t0
    return latents, timings, config


def save_outputs(job: SingleJob, text: str, sampler, latents: dict, timings: dict, resolved: dict, out: Path,
                 stem: str) -> dict:
    """Sample and save the image of each method with `sampler` (and the noises with --save_noise); returns
    {what: file name}."""
    methods = ["gnsnet", *(["standard"] if job.generate_standard else []), *(["oracle"] if "oracle" in latents else [])]
    files = {}
    s = job.sampling
    device = family_of(sampler).device
    for method in methods:
        z = latents["source" if method == "standard" else method]
        _sync(device)
        t0 = time.perf_counter()
        image = sample_images(sampler, [text], z, s.num_inference_steps, s.guidance_scale, s.negative_prompt,
                              resolved["height_used"], resolved["width_used"])[0]
        _sync(device)
        timings[f"{method}_sampling_seconds"] = time.perf_counter() - t0
        files[method] = f"{stem}_{method}.png"
        atomic_save_image(image, out / files[method])
        logger.info("saved %s", out / files[method])
    sampling = timings["gnsnet_sampling_seconds"]
    timings["rollout_over_sampling"] = timings["rollout_seconds"] / sampling
    timings["noise_over_sampling"] = (timings["rollout_seconds"] + timings["text_embedding_seconds"]) / sampling
    if job.save_noise:
        noises = {"source_noise": latents["source"], "golden_noise": latents["gnsnet"]}
        if "oracle" in latents:
            noises["oracle_noise"] = latents["oracle"]
        for name, z in noises.items():
            files[name] = f"{stem}_{name}.pt"
            atomic_torch_save(z[0].detach().float().cpu().clone(), out / files[name])  # (C, H, W)
    return files
