"""The cells of a sweep and the batch-runner units that make their images.

A cell is one row group of sweep.csv: (guidance scale, sampling steps, method, rollout length n). A unit is one
batch-runner output folder and method: every image a unit makes is computed once and shared by every cell that
needs it, so the standard images of a (guidance, steps) pair are the `standard` cell, best_of_K's candidate k = 0,
and the baseline of every paired comparison at that pair (and of the "vs tuned guidance" ones).

Seed rule: prompt index i gets seed start_seed + i (as in stage 5); best_of_K's candidate k of prompt i gets
seed start_seed + i + k * SEED_STRIDE, so k = 0 is the standard sample itself, and candidates never share a seed
with another prompt or candidate while the prompt file has at most SEED_STRIDE lines.

    cells/w{w}_s{s}/standard_output/{i}.png            standard = candidate k = 0
    cells/w{w}_s{s}/k{k}/standard_output/{i}.png       best_of_K's candidate k >= 1
    cells/w{w}_s{s}_n{n}/{gnsnet,oracle}_output/{i}.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..methods import best_of_k, order_key

SEED_STRIDE = 1_000_000
CELLS_DIR = "cells"
GOLDEN = ("gnsnet", "oracle")  # the methods with a rollout length n


@dataclass(frozen=True)
class Unit:
    """One batch-runner job of a sweep: a method's images at one guidance scale, step count and n (or candidate k)."""

    guidance_scale: float
    num_inference_steps: int
    method: str                 # standard, gnsnet or oracle (a batch-runner method)
    num_gen_steps: int | None = None
    k: int = 0                  # best_of_K candidate (standard only); 0 = the standard sample

    @property
    def seed_offset(self) -> int:
        """What the unit adds to --start_seed: k * SEED_STRIDE."""
        return self.k * SEED_STRIDE

    def folder(self, root: str | Path) -> Path:
        """The unit's batch-runner output folder (see the module docstring)."""
        base = f"w{float(self.guidance_scale)!r}_s{int(self.num_inference_steps)}"
        if self.method in GOLDEN:
            return Path(root) / CELLS_DIR / f"{base}_n{self.num_gen_steps}"
        return Path(root) / CELLS_DIR / base / (f"k{self.k}" if self.k else "")

    def label(self) -> str:
        n = f" n={self.num_gen_steps}" if self.num_gen_steps else ""
        k = f" candidate k={self.k}" if self.k else ""
        return f"{self.method} w={self.guidance_scale:g} steps={self.num_inference_steps}{n}{k}"


@dataclass(frozen=True)
class Cell:
    """One (guidance scale, steps, method, n) of the grid; n is None for standard and best_of_K."""

    guidance_scale: float
    num_inference_steps: int
    method: str
    num_gen_steps: int | None = None

    @property
    def k(self) -> int:
        """K of best_of_K (1 for the other methods)."""
        return best_of_k(self.method) or 1

    def units(self) -> list[Unit]:
        """The units whose images the cell uses: best_of_K's K candidates, else its own method's."""
        w, s = self.guidance_scale, self.num_inference_steps
        if best_of_k(self.method):
            return [Unit(w, s, "standard", None, k) for k in range(self.k)]
        return [Unit(w, s, self.method, self.num_gen_steps)]

    def baseline(self) -> "Cell":
        """The standard cell at the same guidance scale and steps."""
        return Cell(self.guidance_scale, self.num_inference_steps, "standard")


def grid_cells(guidance_scales: Sequence[float], steps: Sequence[int], methods: Sequence[str],
               num_gen_steps: Sequence[int]) -> list[Cell]:
    """Every cell of the grid, by steps, then guidance, then method (standard first), then n; `standard` is always
    included: it is every comparison's baseline."""
    names = sorted(set(methods) | {"standard"}, key=order_key)
    cells = []
    for s in dict.fromkeys(int(v) for v in steps):
        for w in dict.fromkeys(float(v) for v in guidance_scales):
            for m in names:
                ns = list(dict.fromkeys(int(n) for n in num_gen_steps)) if m in GOLDEN else [None]
                cells += [Cell(w, s, m, n) for n in ns]
    return cells


def grid_units(cells: Iterable[Cell]) -> list[Unit]:
    """The distinct units the cells need, each once, in first-use order."""
    return list(dict.fromkeys(u for c in cells for u in c.units()))
