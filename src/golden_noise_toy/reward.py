"""`toy_attributes`: prompt adherence in a toy world, scored by the world's attribute classifier.

The score of an (image, prompt) pair is the mean, over the attributes the prompt names (colour, shape,
size: parsed with the world's caption grammar stored in the reward's config), of the classifier's
probability that the image shows the named value. It lies in [0, 1]; 1 means every attribute is surely right.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from golden_noise.errors import UserError
from golden_noise.runtime import resolve_device, resolve_dtype
from .components import AttributeClassifier, ClassifierConfig
from .grammar import parse_prompt
from golden_noise.rewards.base import RewardModel, register_reward

REWARD_DIR = "toy_reward"


def _reward_dir(path: str | Path | None) -> Path:
    if path is None:
        raise UserError("the toy_attributes metric needs the toy world: pass its directory (the --base_model_id "
                        "you sampled with) as the reward path")
    path = Path(path).expanduser()
    for candidate in (path, path / REWARD_DIR):
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    raise UserError(f"{path} holds no toy-world reward ({REWARD_DIR}/config.json and model.safetensors): "
                    "pass a world built by scripts/build_toy_world.py")


@register_reward("toy_attributes")
class ToyAttributeReward(RewardModel):
    """Mean probability, over the attributes the prompt names, that the image shows the named value."""

    name = "toy_attributes"

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, batch_size: int = 256, **_ignored):
        from safetensors.torch import load_file

        folder = _reward_dir(path)
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.config = ClassifierConfig(attributes=raw["attributes"], template=raw["template"],
                                       image_size=raw["image_size"], channels=raw["channels"])
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_dtype(dtype or "float32")  # None = auto: the classifier is tiny, float32 everywhere
        self.batch_size = int(batch_size)
        self.model = AttributeClassifier(self.config)
        self.model.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.model.to(self.device, self.dtype).eval()

    def _tensor(self, images: Sequence) -> torch.Tensor:
        """PIL images (any size/mode) or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, S, S) in [0, 1]."""
        if isinstance(images, torch.Tensor):
            x = images.float()
        else:
            import numpy as np

            x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                             for im in images])
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x

    @torch.no_grad()
    def probabilities(self, images: Sequence) -> dict[str, torch.Tensor]:
        """Attribute name -> (B, values) class probabilities."""
        x = self._tensor(images)
        parts: dict[str, list] = {name: [] for name in self.config.attributes}
        for i in range(0, len(x), self.batch_size):
            logits = self.model(x[i:i + self.batch_size].to(self.device, self.dtype))
            for name in parts:
                parts[name].append(logits[name].float().softmax(-1).cpu())
        return {name: torch.cat(v) for name, v in parts.items()}

    def details(self, images: Sequence, prompts: Sequence[str]) -> dict[str, list]:
        """Per pair: 'score', 'all_correct' (every named attribute is the argmax) and each attribute's probability."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        named = []
        for prompt in prompts:
            values = parse_prompt(prompt, self.config.attributes)
            if not values:
                raise UserError(f"toy_attributes: the prompt {prompt!r} names none of the toy world's attributes "
                                f"({self.config.template!r}); score toy-world prompts only")
            named.append(values)
        probs = self.probabilities(images)
        out: dict[str, list] = {"score": [], "all_correct": [], **{f"p_{n}": [] for n in self.config.attributes}}
        for i, values in enumerate(named):
            ps, right = [], True
            for name in self.config.attributes:
                if name not in values:
                    out[f"p_{name}"].append(float("nan"))
                    continue
                p = probs[name][i]
                ps.append(p[values[name]].item())
                right = right and int(p.argmax()) == values[name]
                out[f"p_{name}"].append(ps[-1])
            out["score"].append(sum(ps) / len(ps))
            out["all_correct"].append(bool(right))
        return out

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        return self.details(images, prompts)["score"]
