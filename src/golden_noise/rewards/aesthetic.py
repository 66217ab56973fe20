"""LAION improved aesthetic predictor: an MLP on L2-normalised CLIP ViT-L/14 image embeddings (prompt-free).

Weights `sac+logos+ava1-l14-linearMSE.pth` (a plain state dict, loaded with weights_only) from the hub repo
`camenduru/improved-aesthetic-predictor`; CLIP from `openai/clip-vit-large-patch14` via transformers (the
original used OpenAI's `clip` package: same weights, the same resize/centre-crop/normalise preprocessing up to
resampling details). Scores are about 1-10. `path` is the MLP weights file, or a folder holding a saved
CLIPModel + processor and one of MLP_FILES; `clip` overrides where CLIP comes from.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from ..errors import UserError, one_line
from ._common import ClipFeatures, check_local, device_and_dtype, hub_file, load_clip
from .base import RewardModel, register_reward

HUB_REPO = "camenduru/improved-aesthetic-predictor"
MLP_FILES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic_mlp.pth", "aesthetic_mlp.safetensors")
CLIP_ID = "openai/clip-vit-large-patch14"


class AestheticMLP(nn.Module):
    """The LAION predictor head (dropouts are inactive in eval); keys `layers.{0,2,4,6,7}.*`."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, 1)
        return self.layers(x)


def load_mlp(path: str) -> AestheticMLP:
    """Build the MLP at the input size its weights imply and load them (no pickled code runs)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        mlp = AestheticMLP(int(state["layers.0.weight"].shape[1]))
        mlp.load_state_dict(state)
    except Exception as e:
        raise UserError(f"aesthetic: cannot load the predictor weights {path} ({one_line(e, 200)}): pass "
                        f"{MLP_FILES[0]} with --reward_path aesthetic=PATH") from None
    return mlp.eval().requires_grad_(False)


@register_reward("aesthetic")
class AestheticReward(RewardModel):
    """LAION aesthetic score of images (the prompts are ignored)."""

    name = "aesthetic"

    def __init__(self, path: str | None = None, device="auto", dtype=None, batch_size: int = 8,
                 clip: str | None = None, **_):
        self.device, self.dtype = device_and_dtype(device, dtype)
        clip_id = clip or CLIP_ID
        if path is None:
            weights = hub_file(HUB_REPO, MLP_FILES[0], self.name)
        else:
            path = check_local(path, self.name)
            if os.path.isdir(path):
                found = [os.path.join(path, f) for f in MLP_FILES if os.path.isfile(os.path.join(path, f))]
                if not found:
                    raise UserError(f"aesthetic: folder {path} holds none of {', '.join(MLP_FILES)}")
                weights, clip_id = found[0], clip or path
            else:
                weights = path
        self.mlp = load_mlp(weights).to(self.device)
        model, proc = load_clip(clip_id, None, self.name)
        self.features = ClipFeatures(model, proc, self.device, self.dtype)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(images), max(1, self.batch_size)):
            emb = self.features.images(images[start:start + self.batch_size])  # (B, D) unit, float32
            out.extend(self.mlp(emb).squeeze(-1).cpu().tolist())
        return out
