"""CLIPScore (Hessel et al., 2021) with OpenAI CLIP ViT-L/14 via transformers.

Score = 100 * max(cosine(image, text), 0), the convention of torchmetrics' `CLIPScore` (about 25-35 for
SDXL images); prompts are truncated to CLIP's 77 tokens. Model and processor come from
`openai/clip-vit-large-patch14` or a local folder holding both.
"""
from __future__ import annotations

from typing import Sequence

from ._common import ClipFeatures, device_and_dtype, load_clip
from .base import RewardModel, register_reward

MODEL_ID = "openai/clip-vit-large-patch14"


@register_reward("clipscore")
class CLIPScoreReward(RewardModel):
    """CLIPScore of (image, prompt) pairs."""

    name = "clipscore"

    def __init__(self, path: str | None = None, device="auto", dtype=None, batch_size: int = 8, **_):
        self.device, self.dtype = device_and_dtype(device, dtype)
        model, proc = load_clip(path or MODEL_ID, None, self.name)
        self.features = ClipFeatures(model, proc, self.device, self.dtype)
        self.batch_size = batch_size

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        cos = self.features.cosines(images, prompts, self.batch_size)  # (N,)
        return (100.0 * cos.clamp(min=0)).tolist()
