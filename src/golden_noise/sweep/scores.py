"""Reward scores of a sweep's units (scored once, kept per unit and metric, so a rerun scores only what is new),
the per-unit costs recorded by the batch runner, and best_of_K's selection among its candidates."""
from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..evaluation import Metric, progress_bar, score_images
from ..io import atomic_write_json
from ..methods import folder
from ..runtime import get_logger
from .grid import Cell, Unit
from ..inference.batch import image_seconds
from ..rewards.base import load_reward

logger = get_logger(__name__)


@dataclass
class UnitScores:
    """One unit's scores under one metric, aligned with the sweep's prompt indices, and the seconds they took."""

    scores: np.ndarray   # (P,) float64
    seconds: float       # scoring wall time of the P images


def image_files(unit: Unit, out: Path, indices: Sequence[int]) -> list[Path]:
    return [unit.folder(out) / folder(unit.method) / f"{i}.png" for i in indices]


def scores_path(unit: Unit, out: Path, metric: str) -> Path:
    return unit.folder(out) / "scores" / unit.method / f"{metric}.json"


def read_unit_scores(path: Path, metric: Metric, indices: Sequence[int]) -> UnitScores | None:
    """The recorded scores of a unit, or None when there are none for these prompts and this reward."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("indices") != list(indices) or record.get("reward") != metric.reward:
        return None
    return UnitScores(np.asarray(record["scores"], dtype=np.float64), float(record["seconds"]))


def check_rewards(metrics: Sequence[Metric]) -> None:
    """Load every metric's reward once and let it go (one in memory at a time): a bad --reward_path, or a reward
    that cannot be built, fails now, before the sweep writes anything, not after its images, when the settings it
    recorded would refuse the corrected rerun."""
    import gc

    for metric in metrics:
        reward = load_reward(metric.reward, **metric.options)
        del reward
        gc.collect()


def score_units(units: Sequence[Unit], metrics: Sequence[Metric], out: Path, indices: Sequence[int],
                texts: Sequence[str], progress: bool = True) -> dict[tuple[Unit, str], UnitScores]:
    """{(unit, metric name): scores} for every unit and metric; each metric's reward is loaded once, and only
    when some unit still lacks its scores (evaluation.score_images does the scoring)."""
    result: dict[tuple[Unit, str], UnitScores] = {}
    for metric in metrics:
        todo = []
        for unit in units:
            known = read_unit_scores(scores_path(unit, out, metric.name), metric, indices)
            if known is None:
                todo.append(unit)
            else:
                result[unit, metric.name] = known
        if not todo:
            continue
        reward = load_reward(metric.reward, **metric.options)
        with progress_bar(len(todo) * len(indices), f"scoring {metric.name}", progress) as bar:
            for unit in todo:
                t0 = time.perf_counter()
                values = score_images(reward, image_files(unit, out, indices), texts,
                                      metric.options.get("batch_size", 8), metric.name, bar)
                seconds = time.perf_counter() - t0
                atomic_write_json(scores_path(unit, out, metric.name),
                                  {"metric": metric.name, "reward": metric.reward, "indices": list(indices),
                                   "scores": values, "seconds": seconds})
                result[unit, metric.name] = UnitScores(np.asarray(values, dtype=np.float64), seconds)
        logger.info("%s: scored %d unit(s) of %d images (%d already scored)", metric.name, len(todo), len(indices),
                    len(units) - len(todo))
        del reward
    return result


@dataclass
class UnitCost:
    """Per image of a unit, from its batch-runner folder: denoiser rows (noise + sampling) and seconds."""

    unet_evals: float
    seconds: float


def unit_cost(unit: Unit, out: Path) -> UnitCost:
    """Mean denoiser rows (manifest.csv) and seconds (timings.csv) per image of the unit's method, recorded when
    each image was made, so a resumed unit reports what its images cost."""
    path = unit.folder(out) / "manifest.csv"
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("method") == unit.method]
        evals = [float(r["unet_evals"]) for r in rows]
        seconds = image_seconds(unit.folder(out), unit.method)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"cannot read the costs of {unit.label()} from {path} ({e}): delete "
                        f"{unit.folder(out)} and rerun to make the cell again") from None
    if not rows or not seconds:
        raise UserError(f"{path} lists no {unit.method} image: delete {unit.folder(out)} and rerun")
    return UnitCost(float(np.mean(evals)), float(np.mean(seconds)))


def best_of_choice(cell: Cell, scores: dict[tuple[Unit, str], UnitScores], selection: str) -> np.ndarray:
    """(P,) the candidate k each prompt keeps: the highest `selection` score (the lowest k on a tie)."""
    sel = np.stack([scores[u, selection].scores for u in cell.units()])  # (K, P)
    return sel.argmax(axis=0)


def cell_scores(cell: Cell, scores: dict[tuple[Unit, str], UnitScores], metric: str, selection: str) -> np.ndarray:
    """(P,) a cell's scores under `metric`: its unit's, or for best_of_K each prompt's selected candidate's."""
    units = cell.units()
    if len(units) == 1:
        return scores[units[0], metric].scores
    values = np.stack([scores[u, metric].scores for u in units])  # (K, P)
    return values[best_of_choice(cell, scores, selection), np.arange(values.shape[1])]
