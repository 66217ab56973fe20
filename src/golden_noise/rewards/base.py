"""One interface for every reward model (image-text preference / adherence scorers), and a lazy registry.

A scorer module registers a factory with `@register_reward(name)`. `load_reward(name, **options)` imports the
scorer's module on first use (listing the names imports none of them, so an HPSv2 evaluation never imports
the toy world) and calls the factory with the options it accepts. Every factory accepts `path` (a local
file/folder or hub id; None = the default weights), `device` ("auto", "cpu", "cuda", ... or a torch.device),
`dtype` (None/"auto" = float16 on CUDA, float32 elsewhere) and `batch_size`, plus its own (e.g. `version` for
hpsv2).
"""
from __future__ import annotations

import importlib
import inspect
from abc import ABC, abstractmethod
from typing import Callable, Sequence

from ..errors import UserError

# name -> the module that registers it (imported on first use)
BUILTIN_REWARDS = {
    "aesthetic": "golden_noise.rewards.aesthetic",
    "clipscore": "golden_noise.rewards.clipscore",
    "hpsv2": "golden_noise.rewards.hpsv2",
    "pickscore": "golden_noise.rewards.pickscore",
    "toy_attributes": "golden_noise_toy.reward",
}
_REGISTRY: dict[str, Callable[..., "RewardModel"]] = {}


class RewardModel(ABC):
    """Scores (image, prompt) pairs; higher is better. Subclasses live one per module in this package."""

    name: str = "reward"

    @abstractmethod
    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        """Score PIL images against their prompts (same length), one float each."""


def register_reward(name: str):
    """Class/factory decorator: make a reward loadable as `load_reward(name, **options)`."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    """Every registered or built-in reward name (imports nothing)."""
    return sorted(set(BUILTIN_REWARDS) | set(_REGISTRY))


def reward_factory(name: str) -> Callable[..., "RewardModel"]:
    """The factory registered as `name`, importing its module on first use."""
    if name not in _REGISTRY and name in BUILTIN_REWARDS:
        importlib.import_module(BUILTIN_REWARDS[name])
    if name not in _REGISTRY:
        raise UserError(f"unknown metric {name!r}: choose from {', '.join(available_rewards())}")
    return _REGISTRY[name]


def load_reward(name: str, **options) -> RewardModel:
    """Build the reward `name` with the options its factory accepts (all of them if it takes **kwargs)."""
    factory = reward_factory(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return factory(**options)
