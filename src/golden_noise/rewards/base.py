"""One interface for every reward model (image-text preference / adherence scorers).

A scorer module registers a factory with `@register_reward(name)`; `load_reward(name, **options)` calls it
with keyword options. Every factory accepts `path` (a local file/folder or hub id; None = the default
weights), `device` ("auto", "cpu", "cuda", ... or a torch.device), `dtype` (None/"auto" = float16 on CUDA,
float32 elsewhere) and `batch_size`, plus its own (e.g. `version` for hpsv2), and ignores options it does
not use (`**_`), so one call site can pass the common ones to any scorer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

from ..io import UserError

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
    from . import _load_all  # noqa: F401  (importing registers every scorer module)

    return sorted(_REGISTRY)


def load_reward(name: str, **options) -> RewardModel:
    """Build the reward registered as `name`; options are the scorer's own (path, device, batch_size, ...)."""
    names = available_rewards()
    if name not in _REGISTRY:
        raise UserError(f"unknown metric {name!r}: choose from {', '.join(names)}")
    return _REGISTRY[name](**options)
