"""The cells of a sweep and the batch-runner units that make their images.

A cell is one row group of sweep.csv: (guidance scale, sampling steps, method, rollout length n; the one-step
methods direct and npnet have the one n their model predicts). A unit is one
batch-runner output folder and method: every image a unit makes is computed once and shared by every cell that
needs it, so the standard images of a (guidance, steps) pair are the `standard` cell, best_of_K's candidate k = 0,
and the baseline of every paired comparison at that pair (and of the "vs tuned guidance" ones).

Seed rule: prompt index i gets seed start_seed + i (as in stage 5); best_of_K's candidate k of prompt i gets
seed start_seed + i + k * SEED_STRIDE, so k = 0 is the standard sample itself, and candidates never share a seed
with another prompt or candidate while the prompt file has at most SEED_STRIDE lines.

    cells/w{w}_s{s}/standard_output/{i}.png            standard = candidate k = 0
    cells/w{w}_s{s}/k{k}/standard_output/{i}.png       best_of_K's candidate k >= 1
    cells/w{w}_s{s}_n{n}/{gnsnet,direct,npnet,oracle}_output/{i}.png
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from ..methods import ONE_STEP, best_of_k, order_key

SEED_STRIDE = 1_000_000
CELLS_DIR = "cells"
GOLDEN = ("gnsnet", "oracle")  # the methods whose rollout length n the grid sets (--num_gen_steps)


@dataclass(frozen=True)
class Unit:
    """One batch-runner job of a sweep: a method's images at one guidance scale, step count and n (or candidate k)."""

    guidance_scale: float
    num_inference_steps: int
    method: str                 # standard, gnsnet, direct, npnet or oracle (a batch-runner method)
    num_gen_steps: int | None = None
    k: int = 0                  # best_of_K candidate (standard only); 0 = the standard sample

    @property
    def seed_offset(self) -> int:
        """What the unit adds to --start_seed: k * SEED_STRIDE."""
        return self.k * SEED_STRIDE

    def folder(self, root: str | Path) -> Path:
        """The unit's batch-runner output folder (see the module docstring)."""
        base = f"w{float(self.guidance_scale)!r}_s{int(self.num_inference_steps)}"
        if self.num_gen_steps is not None:
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
               num_gen_steps: Sequence[int], fixed_n: dict[str, int] | None = None,
               standard_steps: Sequence[int] = ()) -> list[Cell]:
    """Every cell of the grid, by steps, then guidance, then method (standard first), then n; `standard` is always
    included: it is every comparison's baseline. gnsnet and oracle get every n of `num_gen_steps`, a one-step
    method (direct, npnet) the n its model predicts (`fixed_n`); `standard_steps` adds standard-only cells at more
    step counts (the matched-compute baselines)."""
    names = sorted(set(methods) | {"standard"}, key=order_key)
    cells = []
    steps = list(dict.fromkeys(int(v) for v in steps))
    for s in dict.fromkeys([*steps, *(int(v) for v in standard_steps)]):
        for w in dict.fromkeys(float(v) for v in guidance_scales):
            for m in (names if s in steps else ["standard"]):
                if m in GOLDEN:
                    ns = list(dict.fromkeys(int(n) for n in num_gen_steps))
                else:
                    ns = [int((fixed_n or {})[m])] if m in ONE_STEP else [None]
                cells += [Cell(w, s, m, n) for n in ns]
    return cells


def grid_units(cells: Iterable[Cell]) -> list[Unit]:
    """The distinct units the cells need, each once, in first-use order."""
    return list(dict.fromkeys(u for c in cells for u in c.units()))
