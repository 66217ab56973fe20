"""HPSv2 (Human Preference Score v2): open_clip ViT-H-14 fine-tuned on human preferences (Wu et al., 2023).

Same numbers as the reference `hpsv2` package (`hpsv2.img_score.score`) on the same weights: the same
architecture, built with `pretrained=None` (the LAION weights the checkpoint would overwrite are never
downloaded), the official checkpoint (`xswu/HPSv2`), the reference's preprocessing (resize the longest side to
224, bicubic with antialiasing on the [0, 1] tensor, zero-pad to a centred square, OpenAI CLIP mean/std) and
score = cosine(image features, text features), about 0.2-0.35 (papers print it x100). Batched; on CUDA the
default is float16 autocast, as the reference does. Differences: RGBA images are converted to RGB (the
reference feeds 4 channels and fails), and an image whose longest side is already 224 is still padded square.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError, one_line
from ._common import autocast, batches, check_local, device_and_dtype, hub_file
from .base import RewardModel, register_reward

HUB_REPO = "xswu/HPSv2"
CHECKPOINTS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
ARCHITECTURE = "ViT-H-14"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def hps_preprocess(image, size: int = 224, device=None) -> torch.Tensor:
    """PIL image -> (3, size, size) tensor exactly as the reference's `ResizeMaxSize` validation transform
    (resized on `device`: on CUDA the bicubic kernel may differ from the CPU one in the last float bits)."""
    import torchvision.transforms.functional as F

    x = F.to_tensor(image.convert("RGB")).to(device)  # (3, H, W) in [0, 1]
    height, width = x.shape[1:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        new_size = [round(height * scale), round(width * scale)]
        x = F.resize(x, new_size, F.InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - x.shape[1], size - x.shape[2]
    if pad_h or pad_w:
        x = F.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return F.normalize(x, OPENAI_MEAN, OPENAI_STD)


def resolve_architecture(architecture: str) -> str:
    """An open_clip model name, or a path to an open_clip model-config JSON (registered under its file stem)."""
    import open_clip

    if architecture.endswith(".json"):
        path = Path(check_local(architecture, "hpsv2"))
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"hpsv2: cannot read the model config {path} ({one_line(e)})") from None
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"hpsv2: {path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        open_clip.add_model_config(path)
        return path.stem
    if architecture not in open_clip.list_models():
        raise UserError(f"hpsv2: unknown open_clip architecture {architecture!r}: pass a model name such as "
                        f"{ARCHITECTURE} or a model-config .json path")
    return architecture


def load_hps_state_dict(path: str) -> dict:
    """The checkpoint's state dict ({'state_dict': ...} or bare), loaded without executing pickled code."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"hpsv2: cannot read checkpoint {path} ({one_line(e, 200)}): pass an "
                        "HPS_v2*.pt file with --hps_checkpoint") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise UserError(f"hpsv2: {path} holds no state dict: pass an HPS_v2*.pt file with --hps_checkpoint")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


@register_reward("hpsv2")
class HPSv2Reward(RewardModel):
    """HPSv2 / v2.1 preference score of (image, prompt) pairs."""

    name = "hpsv2"

    def __init__(self, path: str | None = None, device="auto", dtype=None, batch_size: int = 8,
                 version: str = "v2.1", architecture: str = ARCHITECTURE, **_):
        import open_clip

        if version not in CHECKPOINTS:
            raise UserError(f"hpsv2: unknown --hps_version {version!r}: choose from {', '.join(CHECKPOINTS)}")
        self.version, self.batch_size = version, batch_size
        self.device, self.dtype = device_and_dtype(device, dtype)
        self.checkpoint = check_local(path, "hpsv2") if path else hub_file(HUB_REPO, CHECKPOINTS[version], "hpsv2")
        if os.path.isdir(self.checkpoint):
            candidate = os.path.join(self.checkpoint, CHECKPOINTS[version])
            if not os.path.isfile(candidate):
                raise UserError(f"hpsv2: folder {path} has no {CHECKPOINTS[version]}: pass the checkpoint file")
            self.checkpoint = candidate
        name = os.path.basename(self.checkpoint)
        if name in CHECKPOINTS.values() and name != CHECKPOINTS[version]:
            logging.getLogger(__name__).warning("hpsv2: checkpoint %s is not the %s checkpoint (%s): the scores "
                                                "are those of the file given", self.checkpoint, version,
                                                CHECKPOINTS[version])
        model_name = resolve_architecture(architecture)
        logging.disable(logging.WARNING)  # open_clip logs each step, and "no pretrained weights", on the root logger
        try:
            model = open_clip.create_model(model_name, pretrained=None, precision="fp32", device="cpu")
            self.tokenizer = open_clip.get_tokenizer(model_name)
        finally:
            logging.disable(logging.NOTSET)
        try:
            model.load_state_dict(load_hps_state_dict(self.checkpoint))
        except RuntimeError as e:
            raise UserError(f"hpsv2: checkpoint {self.checkpoint} does not fit the {model_name} architecture "
                            f"({one_line(e, 200)})") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        size = model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, D) unit text features, cached by prompt (each prompt is scored once per method)."""
        todo = sorted({p for p in prompts if p not in self._text_cache})
        for chunk in batches(todo, self.batch_size):
            tokens = self.tokenizer(list(chunk)).to(self.device)
            with autocast(self.device, self.dtype):
                feats = self.model.encode_text(tokens, normalize=True)
            for prompt, vec in zip(chunk, feats.float()):
                self._text_cache[prompt] = vec
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        for start in range(0, len(images), max(1, self.batch_size)):
            ims, ps = images[start:start + self.batch_size], prompts[start:start + self.batch_size]
            pixels = torch.stack([hps_preprocess(im, self.image_size, self.device) for im in ims])  # (B, 3, S, S)
            with autocast(self.device, self.dtype):
                img = self.model.encode_image(pixels, normalize=True)  # (B, D)
            scores.extend((img.float() * self._texts(ps)).sum(-1).cpu().tolist())
        return scores
