"""A toy world small enough for 2 CPU cores, where golden noise is measurable.

32 px images of one coloured shape in one quarter of the image, captioned "a small red circle at the top
left" (colour x shape x size x position), with an SDXL-architecture `StableDiffusionXLPipeline` trained on
them and an attribute classifier as the `toy_attributes` reward. The position attribute is what makes golden
noise matter here, as layout does for SDXL: it is decided in the first, noisiest sampling steps. An optional
student (student.py) is the teacher distilled into a 1-4-step sampler without CFG (the toy SDXL-Turbo).
"""
from .build import PRESETS, Preset, build_world
from .grammar import WorldSpec, parse_prompt
from .student import STUDENT_PRESETS, StudentPreset, build_student, load_student
from .world import load_world_card

__all__ = ["PRESETS", "STUDENT_PRESETS", "Preset", "StudentPreset", "WorldSpec", "build_student", "build_world",
           "load_student", "load_world_card", "parse_prompt"]
