"""Procedural scenes of the toy world: one coloured shape in a named part of the image, rendered anti-aliased."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .grammar import WorldSpec

SUPERSAMPLE = 4


@dataclass
class Scenes:
    """A batch of scenes: attribute indices (N, A) in `WorldSpec.attributes` order (color, shape, size,
    position), shape centres (N, 2) and half-extents (N,) in pixels, RGB colours (N, 3)."""

    labels: torch.Tensor
    center: torch.Tensor
    radius: torch.Tensor
    rgb: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, key) -> "Scenes":
        return Scenes(*(getattr(self, f.name)[key] for f in fields(self)))

    def captions(self, spec: WorldSpec) -> list[str]:
        values = list(spec.attributes.values())
        return [spec.caption(*(values[a][i] for a, i in enumerate(row))) for row in self.labels.tolist()]


def sample_scenes(spec: WorldSpec, n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> Scenes:
    """Draw n scenes: attributes uniform unless `labels` (n, 4) fixes them; size, colour jitter and the
    position within the named half/quarter of the image uniform."""
    g = generator
    if labels is None:
        labels = torch.stack([torch.randint(len(v), (n,), generator=g) for v in spec.attributes.values()], dim=1)
    color, _, size, position = labels.unbind(1)
    ranges = torch.tensor(list(spec.sizes.values()), dtype=torch.float32)  # (S, 2)
    lo, hi = ranges[size, 0], ranges[size, 1]
    radius = lo + (hi - lo) * torch.rand(n, generator=g)
    half = spec.image_size / 2
    # each axis: the centre lies in [lo, hi]; a named half keeps 1 px clear of the midline
    lo = (radius + 1.0)[:, None].expand(n, 2).clone()
    hi = spec.image_size - lo
    sides = torch.tensor([[-1 if v is None else v for v in spec.positions[name]] for name in spec.positions])[position]
    hi = torch.where(sides == 0, torch.minimum(hi, torch.full_like(hi, half - 1)), hi)
    lo = torch.where(sides == 1, torch.maximum(lo, torch.full_like(lo, half + 1)), lo)
    center = lo + (hi - lo).clamp(min=0) * torch.rand(n, 2, generator=g)
    base = torch.tensor(list(spec.colors.values()), dtype=torch.float32)[color]
    rgb = (base + spec.color_jitter * (2 * torch.rand(n, 3, generator=g) - 1)).clamp(0, 1)
    return Scenes(labels, center, radius, rgb)


def _coverage(spec: WorldSpec, scenes: Scenes) -> torch.Tensor:
    """Fraction of each pixel inside the shape, (N, H, W), by supersampling."""
    n, s = len(scenes), spec.image_size * SUPERSAMPLE
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    dx = coords[None, None, :] - scenes.center[:, 0, None, None]  # (N, 1, S)
    dy = coords[None, :, None] - scenes.center[:, 1, None, None]  # (N, S, 1)
    r = scenes.radius[:, None, None]
    shape = scenes.labels[:, 1]
    inside = torch.zeros(n, s, s, dtype=torch.bool)
    for k, name in enumerate(spec.shapes):
        sel = shape == k
        if not sel.any():
            continue
        ax, ay, rr = dx[sel], dy[sel], r[sel]
        if name == "circle":
            m = ax ** 2 + ay ** 2 <= rr ** 2
        elif name == "square":
            m = (ax.abs() <= 0.85 * rr) & (ay.abs() <= 0.85 * rr)
        elif name == "triangle":  # upright isosceles triangle in the [-r, r] box
            m = (ay <= rr) & (ay >= -rr) & (ax.abs() <= (ay + rr) / 2)
        elif name == "cross":
            arm = 0.35 * rr
            m = ((ax.abs() <= rr) & (ay.abs() <= arm)) | ((ay.abs() <= rr) & (ax.abs() <= arm))
        elif name == "diamond":
            m = ax.abs() + ay.abs() <= rr
        else:
            raise ValueError(f"unknown shape {name!r}")
        inside[sel] = m
    return torch.nn.functional.avg_pool2d(inside.float()[:, None], SUPERSAMPLE)[:, 0]


def render(spec: WorldSpec, scenes: Scenes, chunk: int = 512) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]."""
    out = []
    for i in range(0, len(scenes), chunk):
        part = scenes[i:i + chunk]
        a = _coverage(spec, part)[:, None]  # (n, 1, H, W)
        out.append(spec.background * (1 - a) + part.rgb[:, :, None, None] * a)
    return torch.cat(out) if out else torch.zeros(0, 3, spec.image_size, spec.image_size)
