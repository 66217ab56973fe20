"""A distilled few-step sampler for a toy world: the toy analog of SDXL-Turbo / SDXL-Lightning.

The student is a copy of the world's UNet, fine-tuned so that 1-4 DDIM steps with trailing timestep spacing and
NO classifier-free guidance reproduce, from the same x_T and prompt, the image the teacher (the world's own
pipeline) samples with `teacher_steps` DDIM steps at CFG `teacher_guidance`. It is saved as a standard diffusers
UNet folder plus a scheduler folder (`student/unet`, `student/scheduler`), so any StableDiffusionXLPipeline of the
world samples with it once both are swapped in: `pipe(prompt, latents=x_T, num_inference_steps=4,
guidance_scale=1.0)`.

Method: trajectory distillation on the DDIM line (reflow-style pairs, as in Luhman & Luhman 2021 and InstaFlow).
The teacher's sample y and its x_T fix one line x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e (a_t: alphas_cumprod) that
passes through x_T at t = T and through y at the scheduler's final level. An epsilon-prediction UNet that predicts
e anywhere on that line takes every trailing-DDIM chain from x_T exactly to y, whatever its number of steps. The
student learns that on the timesteps the 1..max_steps-step schedules visit, with an x0-space loss.
"""
from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from golden_noise.diffusion import encode_prompts, latent_shape, load_pipeline, sample_images, seeded_noise
from golden_noise.errors import UserError
from golden_noise.io import atomic_write_json
from golden_noise.prompts import read_prompts
from golden_noise.runtime import get_logger
from golden_noise.tables import format_table
from golden_noise.training.core import warmup_cosine
from .reward import ToyAttributeReward
from .training import EMA, ema_step, progress_bar, reproducible_torch, seed_generator
from .world import WORLD_CARD, load_world_card

logger = get_logger(__name__)

STUDENT_DIR = "student"
TRAIN_SEED = 20_000_000   # training pairs' noise seeds (+ 100_000_000 x --seed): apart from the quickstart's
EVAL_SEED = 30_000_000    # (0.., 1_000_000..) and the world's sample check (50_000..); evaluation seeds never train
METHOD = ("trajectory distillation on the DDIM line through (x_T, teacher sample), epsilon prediction, "
          "x0-space loss, initialised from the teacher")


@dataclass
class StudentPreset:
    """Everything that shapes a student besides its world and seed."""

    train_per_caption: int = 16        # training (caption, seed) pairs per caption of the world
    teacher_steps: int = 20            # the teacher's sampler: its own DDIM schedule, this many steps ...
    teacher_guidance: float = 5.5      # ... at this CFG scale
    max_steps: int = 4                 # the student is trained for 1..max_steps trailing-DDIM steps
    steps: int = 1200
    batch: int = 128
    lr: float = 1e-3
    ema_decay: float = 0.99
    eval_per_caption: int = 2          # held-out (caption, seed) pairs per caption for the evaluation
    eval_steps: tuple = (1, 2, 4)
    sample_batch: int = 256            # batch of the teacher's and the evaluation's sampling
    threads: int = 1                   # torch threads while building: the student's bytes do not depend on --threads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval_steps"] = list(self.eval_steps)
        return d


STUDENT_PRESETS = {
    "default": StudentPreset(),
    "small": StudentPreset(train_per_caption=8, steps=600, eval_per_caption=1),
    # seconds: for tests of the plumbing and of determinism
    "test": StudentPreset(train_per_caption=2, teacher_steps=2, steps=3, batch=8, eval_per_caption=1,
                          eval_steps=(1, 2), sample_batch=16),
}


def student_scheduler(config: dict):
    """The student's sampler: DDIM from the world's scheduler config with trailing spacing (the first step at
    t = T, as Turbo/Lightning samplers use), so 1..4 steps start from pure noise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config, timestep_spacing="trailing")


def training_timesteps(scheduler, max_steps: int) -> torch.Tensor:
    """Every timestep the 1..max_steps-step schedules of `scheduler` visit, descending (e.g. 999 749 666 ...)."""
    seen = set()
    for k in range(1, max_steps + 1):
        scheduler.set_timesteps(k)
        seen.update(scheduler.timesteps.tolist())
    return torch.tensor(sorted(seen, reverse=True))


def ddim_line(x_T: torch.Tensor, y: torch.Tensor, alpha_T: float,
              alpha_end: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, e) of the line x_t = sqrt(a_t) x0 + sqrt(1 - a_t) e through x_T at a_t = alpha_T and y at alpha_end."""
    s_T, n_T = alpha_T ** 0.5, (1 - alpha_T) ** 0.5
    s_end, n_end = alpha_end ** 0.5, (1 - alpha_end) ** 0.5
    det = s_T * n_end - n_T * s_end
    x_T, y = x_T.double(), y.double()
    x0 = (n_end * x_T - n_T * y) / det
    e = (s_T * y - s_end * x_T) / det
    return x0.float(), e.float()


def sampler(pipe, unet=None, scheduler=None):
    """A pipeline sharing `pipe`'s components, with `unet` and/or `scheduler` swapped in."""
    parts = {**pipe.components, "unet": pipe.unet if unet is None else unet,
             "scheduler": pipe.scheduler if scheduler is None else scheduler}
    swapped = type(pipe)(**parts, force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
    swapped.set_progress_bar_config(disable=True)
    return swapped


def load_student(pipe, path: str | Path):
    """The world's pipeline `pipe` with the student's UNet and scheduler swapped in (`path`: the world or its
    student folder)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    folder = Path(path)
    folder = folder / STUDENT_DIR if (folder / "model_index.json").is_file() else folder  # a world: its student
    if not all((folder / f).is_file() for f in ("unet/config.json", "scheduler/scheduler_config.json")):
        raise UserError(f"{path} holds no student ({STUDENT_DIR}/unet and {STUDENT_DIR}/scheduler): add one with "
                        f"scripts/build_toy_world.py --output_dir WORLD --student_only")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet")).to(pipe.device).eval()
    return sampler(pipe, unet, DDIMScheduler.from_pretrained(str(folder / "scheduler")))


@torch.no_grad()
def sample_latents(pipe, prompts: Sequence[str], x_T: torch.Tensor, steps: int, guidance: float, batch: int,
                   output_type: str = "latent", quiet: bool = True, desc: str = "teacher"):
    """`pipe`'s samples from `x_T` (B, C, h, w) in batches: latents (B, C, h, w) or a list of PIL images."""
    out, bar = [], progress_bar(len(prompts), desc, quiet)
    for i in range(0, len(prompts), batch):
        out.append(sample_images(pipe, prompts[i:i + batch], x_T[i:i + batch], num_inference_steps=steps,
                                 guidance_scale=guidance, output_type=output_type))
        bar.update(len(out[-1]))
    bar.close()
    return torch.cat(out) if output_type == "latent" else [im for part in out for im in part]


@dataclass
class LineData:
    """The student's training set: each pair's line (x0, e) and caption, plus every caption's conditioning."""

    x0: torch.Tensor        # (N, 4, h, w)
    e: torch.Tensor         # (N, 4, h, w)
    caption: torch.Tensor   # (N,) index into the conditioning
    embeds: torch.Tensor    # (K, 77, D) prompt_embeds of every caption
    pooled: torch.Tensor    # (K, P) pooled prompt embeddings
    time_ids: torch.Tensor  # (1, 6) SDXL micro-conditioning


def train_student(unet, data: LineData, alphas: torch.Tensor, timesteps: torch.Tensor, p: StudentPreset,
                  generator: torch.Generator, quiet: bool = False) -> dict:
    """Fit the epsilon-prediction `unet` to the pairs' lines at `timesteps`, with an x0-space loss (the error a
    step passes on); AdamW, cosine learning rate, gradient clipping, EMA weights left in place."""
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=0.0)
    ema = EMA([unet], p.ema_decay)
    unet.train()
    n = data.x0.shape[0]
    bar = progress_bar(p.steps, "train student", quiet)
    running = None
    for step in range(p.steps):
        for group in opt.param_groups:
            group["lr"] = p.lr * warmup_cosine(step, max(1, p.steps // 20), p.steps)
        idx = torch.randint(n, (p.batch,), generator=generator)
        t = timesteps[torch.randint(len(timesteps), (p.batch,), generator=generator)]
        a = alphas[t].view(-1, 1, 1, 1)
        x0 = data.x0[idx]                                     # (B, 4, h, w)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * data.e[idx]     # on the line, (B, 4, h, w)
        cap = data.caption[idx]
        eps = unet(xt, t, encoder_hidden_states=data.embeds[cap],
                   added_cond_kwargs={"text_embeds": data.pooled[cap],
                                      "time_ids": data.time_ids.expand(p.batch, -1)}).sample
        x0_hat = (xt - (1 - a).sqrt() * eps) / a.sqrt()
        loss = ((x0_hat - x0) ** 2).mean()
        running = ema_step(loss, opt, params, ema, running, bar)
    bar.close()
    ema.copy_to_params()
    unet.eval()
    return {"loss": round(running or 0.0, 5)}


def _pairs(captions: Sequence[str], per_caption: int, first_seed: int) -> tuple[list[str], list[int]]:
    """(prompt, seed) pairs: pair i is caption i mod K with seed first_seed + i."""
    n = per_caption * len(captions)
    return [captions[i % len(captions)] for i in range(n)], [first_seed + i for i in range(n)]


def _pixels(images) -> torch.Tensor:
    """PIL images -> (B, H, W, 3) float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]))


@torch.no_grad()
def evaluate_student(pipe, student_pipe, reward, prompts: Sequence[str], seeds: Sequence[int], p: StudentPreset,
                     quiet: bool = False) -> dict:
    """Per sampler ("target": the teacher's own sampler that the student learns; the teacher with the student's
    scheduler at CFG 1 and at the teacher's CFG; the student at CFG 1): mean reward, accuracy (every attribute
    right) and pixel MSE to the target image."""
    x_T = seeded_noise(seeds, latent_shape(pipe))  # (B, 4, h, w)
    fast = sampler(pipe, scheduler=student_scheduler(pipe.scheduler.config))
    k = max(p.eval_steps)
    runs = ([("teacher", pipe, p.teacher_steps, p.teacher_guidance)]
            + [("teacher", fast, s, 1.0) for s in p.eval_steps] + [("teacher", fast, k, p.teacher_guidance)]
            + [("student", student_pipe, s, 1.0) for s in p.eval_steps])
    result, target = {}, None
    for i, (model, sp, steps, g) in enumerate(runs):
        images = sample_latents(sp, list(prompts), x_T, steps, g, p.sample_batch, output_type="pil", quiet=quiet,
                                desc=f"evaluate {model} {steps} steps")
        detail = reward.details(images, list(prompts))
        pixels = _pixels(images)  # (B, H, W, 3)
        target = pixels if target is None else target
        result["target" if i == 0 else f"{model}_{steps}step_cfg{g:g}"] = {
            "model": model, "scheduler": f"{type(sp.scheduler).__name__} {sp.scheduler.config.timestep_spacing}",
            "steps": steps, "guidance_scale": g, "unet_evals": steps * (2 if g > 1 else 1),
            "mean_reward": round(sum(detail["score"]) / len(images), 4),
            "accuracy": round(sum(detail["all_correct"]) / len(images), 4),
            "mse_to_teacher": round(((pixels - target) ** 2).mean().item(), 5), "images": len(images)}
    return result


def build_student(world: str | Path, preset: str | StudentPreset = "default", seed: int = 0, overwrite: bool = False,
                  quiet: bool = False) -> dict:
    """Distil the world's teacher into `world`/student (built beside it, renamed into place) and add its card to
    world.json as "student"; the world's other files are left as they are. Returns the card."""
    name = preset if isinstance(preset, str) else "custom"
    if isinstance(preset, str):
        if preset not in STUDENT_PRESETS:
            raise UserError(f"unknown --preset {preset!r} for the student: choose one of {', '.join(STUDENT_PRESETS)}")
        preset = STUDENT_PRESETS[preset]
    world = Path(world)
    load_world_card(world)  # a toy world, or a one-line error
    out = world / STUDENT_DIR
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace the student (the rest of the world is kept)")
    tmp, old = (world / f".{STUDENT_DIR}.{what}.{os.getpid()}" for what in ("building", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with reproducible_torch(preset.threads):
            card = _build_student(world, tmp, preset, name, seed, quiet)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        world_card = load_world_card(world)
        world_card[STUDENT_DIR] = card
        atomic_write_json(world / WORLD_CARD, world_card)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    return card


def _build_student(world: Path, out: Path, p: StudentPreset, name: str, seed: int, quiet: bool) -> dict:
    from diffusers import UNet2DConditionModel

    timings, t_all = {}, time.perf_counter()
    pipe = load_pipeline(str(world), dtype="float32", device="cpu")
    captions = [q.text for q in read_prompts(world / "prompts.txt")]

    # 1. the teacher's samples of the training pairs, and the DDIM line through each (x_T, sample)
    clock = time.perf_counter()
    prompts, seeds = _pairs(captions, p.train_per_caption, TRAIN_SEED + 100_000_000 * seed)  # never EVAL_SEED's
    x_T = seeded_noise(seeds, latent_shape(pipe))  # (N, 4, h, w)
    y = sample_latents(pipe, prompts, x_T, p.teacher_steps, p.teacher_guidance, p.sample_batch, quiet=quiet,
                       desc="teacher samples")  # (N, 4, h, w)
    scheduler = student_scheduler(pipe.scheduler.config)
    timesteps = training_timesteps(scheduler, p.max_steps)
    alphas = scheduler.alphas_cumprod  # (1000,)
    x0, e = ddim_line(x_T, y, alphas[timesteps[0]].item(), float(scheduler.final_alpha_cumprod))
    cond = encode_prompts(pipe, captions, with_uncond=False)
    data = LineData(x0=x0, e=e, caption=torch.arange(len(prompts)) % len(captions), embeds=cond.cond_embeds,
                    pooled=cond.cond_pooled, time_ids=cond.time_ids[:1])
    timings["teacher_s"] = time.perf_counter() - clock

    # 2. the student: the teacher's UNet (a fresh copy: its config must not record where the teacher came from),
    # fine-tuned on the lines
    clock = time.perf_counter()
    unet = UNet2DConditionModel.from_config({k: v for k, v in pipe.unet.config.items() if not k.startswith("_")})
    unet.load_state_dict(pipe.unet.state_dict())
    stats = train_student(unet, data, alphas, timesteps, p, seed_generator(seed, 20), quiet)
    unet.save_pretrained(out / "unet")
    scheduler.save_pretrained(out / "scheduler")
    timings["train_s"] = time.perf_counter() - clock

    # 3. held-out (caption, seed) pairs through the saved student, scored with the world's reward
    clock = time.perf_counter()
    eval_prompts, eval_seeds = _pairs(captions, p.eval_per_caption, EVAL_SEED)
    evaluation = evaluate_student(pipe, load_student(pipe, out), ToyAttributeReward(path=str(world)), eval_prompts,
                                  eval_seeds, p, quiet)
    timings["eval_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - t_all
    return {
        "unet": f"{STUDENT_DIR}/unet", "scheduler": f"{STUDENT_DIR}/scheduler", "method": METHOD,
        "preset": name, "seed": seed,
        "teacher": {"steps": p.teacher_steps, "guidance_scale": p.teacher_guidance,
                    "scheduler": f"{type(pipe.scheduler).__name__} {pipe.scheduler.config.timestep_spacing}"},
        "sampling": {"scheduler": f"{type(scheduler).__name__} {scheduler.config.timestep_spacing}",
                     "guidance_scale": 1.0, "num_inference_steps": list(range(1, p.max_steps + 1))},
        "train_pairs": len(prompts), "train_seeds": [seeds[0], seeds[-1]], "train_timesteps": timesteps.tolist(),
        "unet_params": sum(x.numel() for x in unet.parameters()), **stats,
        "eval_pairs": len(eval_prompts), "eval_seeds": [eval_seeds[0], eval_seeds[-1]], "evaluation": evaluation,
        "timings": {k: round(v, 1) for k, v in timings.items()}, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "config": p.to_dict(),
    }


def format_student(card: dict) -> str:
    """The student's evaluation as a text table (one row per sampler)."""
    rows = [(key, r["scheduler"], r["steps"], f"{r['guidance_scale']:g}", r["unet_evals"], f"{r['mean_reward']:.4f}",
             f"{r['accuracy']:.3f}", f"{r['mse_to_teacher']:.5f}") for key, r in card["evaluation"].items()]
    head = (f"student: {card['unet']} + {card['scheduler']} ({card['unet_params']:,} params, {card['train_pairs']} "
            f"training pairs, loss {card['loss']}); {card['eval_pairs']} held-out (caption, seed) pairs:")
    table = format_table(rows, header=("sampler", "scheduler", "steps", "cfg", "UNet evals", "mean reward",
                                       "accuracy", "MSE to target"), align_right=range(2, 8))
    return head + "\n" + table
