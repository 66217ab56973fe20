"""PickScore (Kirstain et al., 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.

Score = logit_scale.exp() * cosine(image, text), as in the model card (about 18-24 for SDXL images).
The model comes from `yuvalkirstain/PickScore_v1` (or a local folder); its processor from
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K`, unless the local folder holds its own tokenizer and processor.
"""
from __future__ import annotations

from typing import Sequence

from ..io import looks_local
from ._common import REWARD_FILE_SUFFIXES, ClipFeatures, device_and_dtype, has_processor_files, load_clip
from .base import RewardModel, register_reward

MODEL_ID = "yuvalkirstain/PickScore_v1"
PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register_reward("pickscore")
class PickScoreReward(RewardModel):
    """PickScore of (image, prompt) pairs."""

    name = "pickscore"

    def __init__(self, path: str | None = None, device="auto", dtype=None, batch_size: int = 8,
                 processor: str | None = None, **_):
        model_id = path or MODEL_ID
        if processor is None:
            local = looks_local(model_id, REWARD_FILE_SUFFIXES)
            processor = model_id if local and has_processor_files(model_id) else PROCESSOR_ID
        self.device, self.dtype = device_and_dtype(device, dtype)
        model, proc = load_clip(model_id, processor, self.name)
        self.features = ClipFeatures(model, proc, self.device, self.dtype)
        self.logit_scale = float(model.logit_scale.exp())
        self.batch_size = batch_size

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        cos = self.features.cosines(images, prompts, self.batch_size)  # (N,)
        return (self.logit_scale * cos).tolist()
