"""golden-noise-rnn: learn golden initial noise for text-to-image diffusion (SDXL).

`from golden_noise import GoldenNoise` is the inference API (imported lazily, so the light modules stay light).
"""
from __future__ import annotations

__all__ = ["GoldenNoise"]


def __getattr__(name: str):
    if name == "GoldenNoise":
        from .inference import GoldenNoise  # lazy: `import golden_noise` stays free of torch and of stage 5

        return GoldenNoise
    raise AttributeError(f"module 'golden_noise' has no attribute {name!r}")
