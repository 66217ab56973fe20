"""NPNet's data recipe, measured: stage 2 can score each sample, so training can keep only the samples whose
golden noise helped (train_rnn_model_v3.py --min_reward_gain).

For a batch of samples, the image sampled from x_T (what `standard` makes) and the one sampled from x'_n (the
oracle's image) are made with the given sampling settings (golden_noise.diffusion.sample_images, the sampling
stage 5 runs) and scored by a reward (golden_noise.rewards: one finite float per image). The scores are stored
per sample (the shards' reward_standard, reward_golden, reward_gain columns); no sample is dropped. Sampling reads
no random numbers, so a scored dataset's tensors equal an unscored one's.

Pipeline order: this module uses the shared core only (diffusion, rewards), never stage 5 or 6 code."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .cli import check_fields, setting
from .diffusion import sample_images
from .rewards.base import load_reward, metric_names, reward_factory, score_loaded_images

# stage 5's sampling defaults (inference.config.SamplingConfig; tests/test_scoring.py checks that they agree)
SAMPLING_GUIDANCE_SCALE, SAMPLING_STEPS = 5.5, 30


@dataclass
class ScoringConfig:
    """How stage 2 scores its samples (the --score_* flags, with their ranges); part of the dataset's settings."""

    score_metric: str | None = setting(None, "score each sample: the images sampled from x_T and from x'_n, scored by "
                                       "this reward (a built-in name or FILE.py:NAME), recorded as reward_standard, "
                                       "reward_golden, reward_gain (no sample is dropped; train with "
                                       "--min_reward_gain to filter)")
    score_reward_path: str | None = setting(None, "model file/folder (or hub id) of --score_metric, e.g. "
                                            "worlds/toy_shapes for toy_attributes")
    score_guidance_scale: float = setting(SAMPLING_GUIDANCE_SCALE, "sampling CFG scale of the scored images "
                                          "(diffusers applies none for a scale <= 1)", min=0)
    score_num_inference_steps: int = setting(SAMPLING_STEPS, "sampling steps of the scored images", min=1)
    score_batch_size: int = setting(32, "images per reward forward pass", min=1)

    def check(self) -> None:
        """Flag errors before any model loads (a value out of range, an unknown metric or a bad FILE.py:NAME)."""
        check_fields(self)
        reward_factory(self.score_metric)

    def record(self) -> dict:
        """run_config.json's `scoring`: what the scores mean (a rerun with another one is refused)."""
        return {"metric": metric_names([self.score_metric])[0], "reward": self.score_metric,
                "reward_path": self.score_reward_path, "guidance_scale": self.score_guidance_scale,
                "num_inference_steps": self.score_num_inference_steps, "images": ["x_T", "x'_n"]}


class SampleScorer:
    """Scores a batch of samples: (prompts, x_T, x'_n) -> (B, 2) float64 [reward_standard, reward_golden]."""

    def __init__(self, pipe, config: ScoringConfig, height: int | None = None, width: int | None = None):
        self.pipe, self.config, self.height, self.width = pipe, config, height, width
        self.name = config.record()["metric"]
        self.reward = load_reward(config.score_metric, path=config.score_reward_path, device=pipe.device,
                                  batch_size=config.score_batch_size)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], x_T: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
        """x_T, golden: (B, C, H, W) -> (B, 2): both sampled in one pipeline call of 2B, then scored."""
        prompts = list(prompts)
        latents = torch.cat([x_T.float(), golden.float()])  # (2B, C, H, W)
        images = sample_images(self.pipe, prompts + prompts, latents, self.config.score_num_inference_steps,
                               self.config.score_guidance_scale, None, self.height, self.width)
        scores = score_loaded_images(self.reward, images, prompts + prompts, self.config.score_batch_size,
                                     self.name)
        return torch.tensor(scores, dtype=torch.float64).view(2, len(prompts)).T.contiguous()  # (B, 2)
