"""A toy world small enough for 2 CPU cores, where golden noise is measurable.

32 px images of one coloured shape in one quarter of the image, captioned "a small red circle at the top
left" (colour x shape x size x position), with an SDXL-architecture `StableDiffusionXLPipeline` trained on
them and an attribute classifier as the `toy_attributes` reward. The position attribute is what makes golden
noise matter here, as layout does for SDXL: it is decided in the first, noisiest sampling steps.
"""
from .build import PRESETS, Preset, build_world, load_world_card
from .grammar import WorldSpec, parse_prompt

__all__ = ["PRESETS", "Preset", "WorldSpec", "build_world", "load_world_card", "parse_prompt"]
