"""Stage 4: the golden-noise image of one prompt and seed (plus standard/oracle images on request)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ..diffusion import latent_shape, sample_images, seeded_noise
from ..errors import UserError
from ..io import atomic_save_image, atomic_torch_save, atomic_write_json
from ..runtime import get_logger
from .api import DEFAULT_NUM_GEN_STEPS, GoldenNoise, _sync, golden_config_from, oracle_noise

logger = get_logger(__name__)


def prompt_slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe stem from a prompt: lower-case words joined by '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def run_single(*, rnn_weights_path: str, prompt: str, output_dir: str = "./inference_output",
               output_name: str | None = None, base_model_id: str | None = None, revision: str | None = None,
               variant: str | None = None, num_gen_steps: int | None = None, num_inference_steps: int = 30,
               guidance_scale: float = 5.5, negative_prompt: str | None = None, scheduler: str = "default",
               seed: int = 42, height: int | None = None, width: int | None = None,
               generate_standard: bool = False, generate_oracle: bool = False, sample_noise: bool = False,
               save_noise: bool = False, dtype: str = "float32", device: str = "auto") -> dict:
    """Stage 4: the golden-noise image of one prompt and seed (plus standard/oracle images on request);
    writes images, noises and `{stem}_settings.json`, and returns the settings dict."""
    settings = dict(locals())  # every flag, first: recorded in the settings JSON
    from importlib.metadata import version

    from ..diffusion import DEFAULT_MODEL_ID, load_pipeline, set_scheduler
    from ..prompts import normalize_prompt
    from ..runtime import resolve_device

    text = normalize_prompt(prompt)
    if not text:
        raise UserError("--prompt is empty: pass a text prompt")
    for name, value in (("--num_inference_steps", num_inference_steps), ("--num_gen_steps", num_gen_steps or 1)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    torch_device = resolve_device(device)
    gn = GoldenNoise.from_pretrained(rnn_weights_path, device=torch_device)
    if sample_noise and not gn.model_config.get("predict_variance", False):
        raise UserError("--sample_noise needs an export trained with predict_variance; this one predicts the "
                        "mean only: drop --sample_noise")
    trained_id = gn.run_config.get("base_model_id")
    model_id = base_model_id or trained_id or DEFAULT_MODEL_ID
    if base_model_id and trained_id and base_model_id != trained_id:
        logger.warning("--base_model_id %s differs from %s, which the RNN was trained with", base_model_id, trained_id)
    pipe = load_pipeline(model_id, revision=revision, variant=variant, dtype=dtype, device=torch_device)
    set_scheduler(pipe, scheduler)
    height, width = height or gn.height, width or gn.width
    gn.check_pipeline(pipe, height, width)
    n = num_gen_steps or gn.num_steps or DEFAULT_NUM_GEN_STEPS
    if gn.num_steps and n != gn.num_steps:
        logger.warning("--num_gen_steps %d differs from the %d steps of the RNN's training sequences", n, gn.num_steps)

    x_T = seeded_noise([seed], latent_shape(pipe, height, width))  # (1, C, H, W) float32
    generator = torch.Generator(device=gn.device).manual_seed(seed) if sample_noise else None
    t0 = time.perf_counter()
    text_embed = gn.text_embeddings([text], pipe)  # (1, P)
    _sync(gn.device)
    t1 = time.perf_counter()
    golden = gn.rollout(x_T, text_embed, n, sample=sample_noise, generator=generator)[:, -1]  # (1, C, H, W)
    _sync(gn.device)
    timings = {"text_embedding_seconds": t1 - t0, "rollout_seconds": time.perf_counter() - t1}

    out = Path(output_dir)
    stem = output_name or f"{prompt_slug(text)}_seed{seed}"
    latents = {"gnsnet": golden}
    if generate_standard:
        latents["standard"] = x_T
    if generate_oracle:
        config = golden_config_from(gn.run_config)
        t0 = time.perf_counter()
        latents["oracle"] = oracle_noise(pipe, [text], x_T, n, config, height, width)
        _sync(pipe.unet.device)
        timings["oracle_seconds"] = time.perf_counter() - t0
        settings["oracle_golden"] = config.to_dict()
    files = {}
    for method, z in latents.items():
        _sync(pipe.unet.device)
        t0 = time.perf_counter()
        image = sample_images(pipe, [text], z, num_inference_steps, guidance_scale, negative_prompt, height, width)[0]
        _sync(pipe.unet.device)
        timings[f"{method}_sampling_seconds"] = time.perf_counter() - t0
        files[method] = f"{stem}_{method}.png"
        atomic_save_image(image, out / files[method])
        logger.info("saved %s", out / files[method])
    sampling = timings["gnsnet_sampling_seconds"]
    timings["rollout_over_sampling"] = timings["rollout_seconds"] / sampling
    timings["noise_over_sampling"] = (timings["rollout_seconds"] + timings["text_embedding_seconds"]) / sampling
    if save_noise:
        noises = {"source_noise": x_T[0], "golden_noise": golden[0]}
        if "oracle" in latents:
            noises["oracle_noise"] = latents["oracle"][0]
        for name, z in noises.items():
            files[name] = f"{stem}_{name}.pt"
            atomic_torch_save(z.detach().float().cpu().clone(), out / files[name])  # (C, H, W)
    settings.update({
        "prompt_used": text, "base_model_id_used": model_id, "num_gen_steps_used": n, "height_used": height,
        "width_used": width, "latent_shape": list(x_T.shape[1:]), "scheduler_class": type(pipe.scheduler).__name__,
        "device_used": str(torch_device), "files": files, "timings": timings,
        "rnn_model_config": gn.model_config, "rnn_run_config": gn.run_config,
        "versions": {pkg: version(pkg) for pkg in ("torch", "diffusers", "transformers")},
    })
    atomic_write_json(out / f"{stem}_settings.json", settings)
    logger.info("rollout %.3fs (%d steps) = %.1f%% of sampling %.3fs; settings in %s", timings["rollout_seconds"], n,
                100 * timings["rollout_over_sampling"], timings["gnsnet_sampling_seconds"],
                out / f"{stem}_settings.json")
    return settings
