"""Build a toy world: procedural data -> VAE -> reward classifier -> text encoders + UNet, saved as a standard
diffusers `StableDiffusionXLPipeline` directory (plus `toy_reward/`, `prompts.txt` and `world.json`)."""
from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from golden_noise.diffusion import (latent_shape, load_pipeline, sample_images, sdxl_scheduler_config, sdxl_time_ids,
                                    seeded_noise)
from golden_noise.errors import UserError

from golden_noise.io import atomic_write_json, atomic_write_text
from golden_noise.runtime import get_logger
from .components import (AttributeClassifier, ClassifierConfig, NetworkConfig, build_text_encoders, build_unet,
                         build_vae)
from .grammar import WorldSpec
from .render import render, sample_scenes
from .reward import ToyAttributeReward
from .student import STUDENT_PRESETS, build_student
from .training import (UNetData, classifier_accuracy, decode_latents, encode_images, reproducible_torch,
                       seed_generator, train_classifier, train_unet, train_vae)
from .world import WORLD_CARD

logger = get_logger(__name__)
REWARD_DIR = "toy_reward"


@dataclass
class Preset:
    """Everything that shapes a world besides its seed."""

    train_images: int = 16384
    eval_images: int = 1024
    vae_steps: int = 600
    vae_batch: int = 32
    vae_crop: int = 32                # train on aligned crops of this size (the VAE is fully convolutional)
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    latent_std: float = 1.0           # std of the diffusion latents (the VAE config's latents_std maps them back)
    classifier_steps: int = 600
    classifier_batch: int = 128
    classifier_lr: float = 3e-3
    classifier_noise: float = 0.05
    unet_steps: int = 3000
    unet_batch: int = 128
    unet_lr: float = 2e-3
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    min_snr_gamma: float = 5.0
    sample_per_caption: int = 2       # images per caption for the build's sampling check
    sample_steps: int = 20
    sample_guidance: tuple = (1.0, 5.0)
    net: NetworkConfig = field(default_factory=NetworkConfig)
    spec: WorldSpec = field(default_factory=WorldSpec)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("net", "spec")}
        d["sample_guidance"] = list(self.sample_guidance)
        d["net"] = self.net.to_dict()
        d["spec"] = self.spec.to_dict()
        return d


PRESETS = {
    "default": Preset(),
    "small": Preset(train_images=4096, eval_images=512, vae_steps=400, classifier_steps=300, unet_steps=1500,
                    unet_batch=64, sample_per_caption=1),
    # seconds: for tests of the plumbing and of determinism; its samples are noise
    "test": Preset(train_images=256, eval_images=64, vae_steps=4, vae_batch=8, vae_crop=16, classifier_steps=60,
                   classifier_batch=32, classifier_lr=1e-2, unet_steps=4, unet_batch=64, sample_per_caption=0,
                   sample_steps=2,
                   net=NetworkConfig(vae_channels=(4, 8, 8), unet_channels=(8, 16), unet_head_dim=4, text_layers=1,
                                     text_intermediate=16, classifier_channels=(8, 16, 16)),
                   spec=WorldSpec(colors={"red": (0.9, 0.1, 0.1), "blue": (0.1, 0.2, 0.9)},
                                  shapes=["circle", "square"], sizes={"small": (3.5, 5.0), "large": (8.5, 10.0)},
                                  positions={"left": (0, None), "right": (1, None)},
                                  template="a {size} {color} {shape} on the {position}")),
}


def build_world(output_dir: str | Path, preset: str | Preset = "default", seed: int = 0, overwrite: bool = False,
                quiet: bool = False, student: bool = False) -> dict:
    """Build the world into `output_dir` (written beside it, renamed into place at the end); return the summary.
    With `student`, also distil the world's few-step student (student.py; the student preset of the same name)."""
    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise UserError(f"unknown --preset {preset!r}: choose one of {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {out} exists and is not empty: pass --overwrite or choose another directory")
    tmp = out.with_name(f".{out.name}.building.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with reproducible_torch():
            summary = _build(tmp, preset, name, seed, quiet)
            if student:
                summary["student"] = build_student(tmp, name if name in STUDENT_PRESETS else "default", seed,
                                                   quiet=quiet)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["output_dir"] = str(out)
    return summary


def _build(out: Path, p: Preset, name: str, seed: int, quiet: bool) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    spec, net = p.spec, p.net
    timings, t_all = {}, time.perf_counter()
    clock = time.perf_counter()

    # 1. procedural data: a training pool and a held-out set
    scenes = sample_scenes(spec, p.train_images, seed_generator(seed, 1))
    images = render(spec, scenes)  # (N, 3, S, S) in [0, 1]
    held = sample_scenes(spec, p.eval_images, seed_generator(seed, 2))
    held_images = render(spec, held)
    timings["render_s"] = time.perf_counter() - clock

    # 2. the VAE, and latent statistics for the pipeline's (de)normalisation
    clock = time.perf_counter()
    vae = build_vae(net, spec.image_size, seed * 1000 + 3)
    stats = train_vae(vae, images, p.vae_steps, p.vae_batch, p.vae_lr, p.vae_kl_weight, p.vae_crop,
                      seed_generator(seed, 4), quiet)
    with torch.no_grad():
        mean, std = encode_images(vae, images)
        ch_mean = mean.mean((0, 2, 3))
        ch_std = mean.std((0, 2, 3))
        vae.register_to_config(scaling_factor=1.0, latents_mean=[round(v, 5) for v in ch_mean.tolist()],
                               latents_std=[round(v, 5) for v in (ch_std / p.latent_std).tolist()])
        ch_mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
        ch_std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
        recon = decode_latents(vae, mean)
        held_mean, _ = encode_images(vae, held_images)
        held_recon = decode_latents(vae, held_mean)
    stats["vae_recon_mse"] = round(torch.mean((held_recon - held_images) ** 2).item(), 5)
    timings["vae_s"] = time.perf_counter() - clock

    # 3. the reward's attribute classifier, on clean renders and VAE reconstructions
    clock = time.perf_counter()
    torch.manual_seed(seed * 1000 + 5)
    cconfig = ClassifierConfig(attributes=spec.attributes, template=spec.template, image_size=spec.image_size,
                               channels=list(net.classifier_channels))
    classifier = AttributeClassifier(cconfig)
    stats.update(train_classifier(classifier, [images, recon], scenes.labels, p.classifier_steps,
                                  p.classifier_batch, p.classifier_lr, p.classifier_noise, seed_generator(seed, 6),
                                  quiet))
    stats["reward_accuracy_clean"] = classifier_accuracy(classifier, held_images, held.labels)
    stats["reward_accuracy_vae"] = classifier_accuracy(classifier, held_recon, held.labels)
    reward_dir = out / REWARD_DIR
    reward_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(reward_dir / "model.safetensors"))
    atomic_write_json(reward_dir / "config.json", {
        **asdict(cconfig),
        "score": "mean over the attributes the prompt names of the classifier's probability of the named value",
    })
    timings["reward_s"] = time.perf_counter() - clock

    # 4. text encoders + UNet, trained jointly on the normalised latents
    clock = time.perf_counter()
    tokenizer, tokenizer_2, te1, te2 = build_text_encoders(net, seed * 1000 + 7)
    latent_size = spec.image_size // 2 ** (len(net.vae_channels) - 1)
    unet = build_unet(net, latent_size, seed * 1000 + 8)
    captions = spec.all_captions()
    caption_index = {c: i for i, c in enumerate(captions)}
    token_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids
    data = UNetData(mean=(mean - ch_mean) / ch_std, std=std / ch_std,
                    caption=torch.tensor([caption_index[c] for c in scenes.captions(spec)]), token_ids=token_ids)
    time_ids = sdxl_time_ids(spec.image_size, spec.image_size, 1)
    stats.update(train_unet(unet, te1, te2, data, sdxl_scheduler_config(), time_ids, p.unet_steps, p.unet_batch,
                            p.unet_lr, p.caption_dropout, p.ema_decay, p.min_snr_gamma, seed_generator(seed, 9),
                            quiet))
    timings["unet_s"] = time.perf_counter() - clock

    # 5. save the pipeline, the prompts and the world card
    clock = time.perf_counter()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=DDIMScheduler(**sdxl_scheduler_config()),
                                     force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out)
    atomic_write_text(out / "prompts.txt", "\n".join(captions) + "\n")
    timings["save_s"] = time.perf_counter() - clock

    # 6. sample through the saved pipeline and score with the saved reward
    clock = time.perf_counter()
    sampling = sample_check(out, captions, p.sample_per_caption, p.sample_steps, p.sample_guidance, seed, quiet)
    timings["sample_check_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - t_all
    timings = {k: round(v, 1) for k, v in timings.items()}

    summary = {
        "preset": name, "seed": seed, "captions": len(captions),
        "image_size": spec.image_size, "latent_shape": [4, latent_size, latent_size],
        "unet_params": sum(x.numel() for x in unet.parameters()),
        "text_encoder_params": sum(x.numel() for m in (te1, te2) for x in m.parameters()),
        "vae_params": sum(x.numel() for x in vae.parameters()),
        "classifier_params": sum(x.numel() for x in classifier.parameters()),
        **stats, "sampling": sampling, "timings": timings,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "config": p.to_dict(),
    }
    atomic_write_json(out / WORLD_CARD, summary)
    return summary


def sample_check(world: Path, captions: list[str], per_caption: int, steps: int, guidance_scales, seed: int,
                 quiet: bool = False) -> dict:
    """Sample `per_caption` images per caption through the saved pipeline at each guidance scale and score
    them with the saved reward: mean reward and the fraction with every attribute right."""
    from tqdm.auto import tqdm

    if per_caption <= 0:
        return {}
    pipe = load_pipeline(str(world), dtype="float32", device="cpu")
    reward = ToyAttributeReward(path=str(world))
    prompts = [c for c in captions for _ in range(per_caption)]
    seeds = [seed * 100_000 + 50_000 + i for i in range(len(prompts))]  # apart from the oracle benchmark's seeds
    latents = seeded_noise(seeds, latent_shape(pipe))
    result = {}
    bar = tqdm(total=len(guidance_scales) * len(prompts), desc="sample check", disable=quiet, leave=False)
    for g in guidance_scales:
        scores, correct = [], []
        for i in range(0, len(prompts), 64):
            imgs = sample_images(pipe, prompts[i:i + 64], latents[i:i + 64], num_inference_steps=steps,
                                 guidance_scale=g)
            detail = reward.details(imgs, prompts[i:i + 64])
            scores += detail["score"]
            correct += detail["all_correct"]
            bar.update(len(imgs))
        result[f"cfg_{g:g}"] = {"mean_reward": round(sum(scores) / len(scores), 4),
                                "accuracy": round(sum(correct) / len(correct), 4), "images": len(scores),
                                "steps": steps}
    bar.close()
    return result
