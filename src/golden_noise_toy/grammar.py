"""The toy world's attributes and caption grammar ("a small red circle at the top left") and its parser."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from itertools import product

COLORS = {  # name -> RGB in [0, 1]
    "red": (0.90, 0.12, 0.12), "orange": (1.00, 0.55, 0.05), "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.20), "blue": (0.15, 0.30, 0.95), "purple": (0.60, 0.15, 0.85),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": (3.5, 5.0), "medium": (6.0, 7.5), "large": (8.5, 10.0)}  # name -> half-extent range, px
POSITIONS = {  # name -> (column, row) half of the image holding the shape's centre; None = anywhere
    "top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1),
}


@dataclass
class WorldSpec:
    """What the world's images vary in, and the caption grammar naming it; JSON-serialisable."""

    colors: dict = field(default_factory=lambda: dict(COLORS))
    shapes: list = field(default_factory=lambda: list(SHAPES))
    sizes: dict = field(default_factory=lambda: dict(SIZES))
    positions: dict = field(default_factory=lambda: dict(POSITIONS))
    image_size: int = 32
    background: float = 0.12          # grey level of the background
    color_jitter: float = 0.04        # uniform +- jitter of each RGB channel
    template: str = "a {size} {color} {shape} at the {position}"

    @property
    def attributes(self) -> dict[str, list[str]]:
        """Attribute name -> its values, in the classifier's head order (and the order of scene labels)."""
        return {"color": list(self.colors), "shape": list(self.shapes), "size": list(self.sizes),
                "position": list(self.positions)}

    def caption(self, color: str, shape: str, size: str, position: str) -> str:
        return self.template.format(color=color, shape=shape, size=size, position=position)

    def all_captions(self) -> list[str]:
        """Every caption of the world, in a fixed order (position, size, color, shape)."""
        return [self.caption(c, s, z, p)
                for p, z, c, s in product(self.positions, self.sizes, self.colors, self.shapes)]

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("colors", "sizes", "positions"):
            d[key] = {k: list(v) for k, v in getattr(self, key).items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldSpec":
        d = dict(d)
        for key in ("colors", "sizes", "positions"):
            d[key] = {k: tuple(v) for k, v in d[key].items()}
        return cls(**d)


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "


def parse_prompt(prompt: str, attributes: dict[str, list[str]]) -> dict[str, int]:
    """Attribute name -> index of the value the prompt names (whole words or phrases, case-insensitive).
    Attributes the prompt does not name, or names ambiguously (two values), are left out."""
    text = _words(prompt)
    named = {}
    for name, values in attributes.items():
        hits = [i for i, v in enumerate(values) if _words(v) in text]
        if len(hits) == 1:
            named[name] = hits[0]
    return named
