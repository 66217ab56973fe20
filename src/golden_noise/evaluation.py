"""Stage 6 logic: find the method folders, pair images with prompts by index, score them, summarise."""
from __future__ import annotations

import gc
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import UserError

from .prompts import Prompt
from .rewards.base import load_reward
from .runtime import get_logger
from .stats import describe, paired_comparison

log = get_logger(__name__)

KNOWN_METHODS = ("standard", "gnsnet", "oracle")  # batch inference's folders, in display order
FOLDER_SUFFIX = "_output"
IMAGE_NAME = re.compile(r"^(\d+)\.png$", re.IGNORECASE)


@dataclass
class Method:
    """One method's image folder and its images by prompt index."""

    name: str
    folder: Path
    files: dict[int, Path] = field(default_factory=dict)


def find_methods(base_dir: str | Path, methods: Sequence[str] | None, baseline: str) -> list[Method]:
    """The method folders under `base_dir`: `{name}_output` (or `{name}` itself), baseline first."""
    base = Path(base_dir)
    if not base.is_dir():
        raise UserError(f"--image_base_dir {base} is not a folder: pass the output folder of batch inference")
    if methods:
        found = []
        for name in methods:
            name = name[:-len(FOLDER_SUFFIX)] if name.endswith(FOLDER_SUFFIX) else name
            folder = next((f for f in (base / f"{name}{FOLDER_SUFFIX}", base / name) if f.is_dir()), None)
            if folder is None:
                raise UserError(f"--methods {name}: neither {base / (name + FOLDER_SUFFIX)} nor {base / name} "
                                "is a folder")
            found.append(Method(name, folder))
    else:
        found = [Method(d.name[:-len(FOLDER_SUFFIX)], d) for d in sorted(base.iterdir())
                 if d.is_dir() and d.name.endswith(FOLDER_SUFFIX) and len(d.name) > len(FOLDER_SUFFIX)]
        if not found:
            raise UserError(f"no *{FOLDER_SUFFIX} folders in {base}: pass the batch-inference output folder as "
                            "--image_base_dir or name the folders with --methods")
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise UserError(f"--methods names a method twice: {', '.join(names)}")
    if baseline not in names:
        raise UserError(f"no folder for the baseline method {baseline!r} ({base / (baseline + FOLDER_SUFFIX)}); "
                        f"found {', '.join(names)}: pass --baseline or --methods")
    order = {name: i for i, name in enumerate(KNOWN_METHODS)}
    return sorted(found, key=lambda m: (m.name != baseline, order.get(m.name, len(order)), m.name))


def collect_images(method: Method, prompts: dict[int, str], prompt_file: str | Path) -> Method:
    """Fill `method.files` with `{index}.png`; an image whose index has no prompt is a UserError."""
    last = max(prompts)
    for path in sorted(method.folder.iterdir()):
        match = IMAGE_NAME.match(path.name)
        if not match or not path.is_file():
            continue
        index = int(match.group(1))
        if index not in prompts:
            why = (f"but {prompt_file} has prompts only up to index {last} (line {last + 1})" if index > last
                   else f"but line {index + 1} of {prompt_file} is blank")
            raise UserError(f"image {path} is for prompt index {index}, {why}: pass the prompt file that batch "
                            "inference used")
        method.files[index] = path
    return method


def pair_images(methods: Sequence[Method], prompts: dict[int, str]) -> tuple[list[int], dict[str, list[int]]]:
    """The indices with an image in every method folder, and per method the prompt indices it lacks."""
    missing = {m.name: sorted(set(prompts) - set(m.files)) for m in methods}
    complete = sorted(set(prompts).intersection(*(m.files for m in methods)))
    if not complete:
        lacks = "; ".join(f"{m.folder} has {len(m.files)} of {len(prompts)} images" for m in methods)
        raise UserError(f"no prompt has an image in every method folder ({lacks}): nothing to compare")
    return complete, missing


def index_ranges(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    parts, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts)


def check_readable(paths: Sequence[Path]) -> None:
    """Open and verify every image before any model is loaded; a bad file is a UserError naming it."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:
            raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}): delete it and rerun batch "
                            "inference, or move it away (its prompt is then reported missing)") from None


def load_image(path: Path):
    """Load an image fully as RGB; a bad file is a UserError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e})") from None


def score_images(reward, files: Sequence[Path], prompts: Sequence[str], batch_size: int) -> list[float]:
    """Score images against their prompts, `batch_size` at a time (memory stays flat); the next batch's
    PNGs are decoded on worker threads while the current one is scored."""
    chunks = [files[start:start + batch_size] for start in range(0, len(files), max(1, batch_size))]
    scores: list[float] = []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as decode, ThreadPoolExecutor(1) as prefetch:
        def load(chunk):
            return list(decode.map(load_image, chunk))

        pending = prefetch.submit(load, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            images = pending.result()
            if k + 1 < len(chunks):
                pending = prefetch.submit(load, chunks[k + 1])
            start = k * batch_size
            scores.extend(float(s) for s in reward.score(images, list(prompts[start:start + len(chunk)])))
    return scores


def score_all(metrics: Sequence[str], methods: Sequence[Method], indices: Sequence[int], prompts: dict[int, str],
              options: dict[str, dict]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """scores[metric][method] (aligned with `indices`) and per-metric throughput; one model in memory at a time."""
    texts = [prompts[i] for i in indices]
    scores: dict[str, dict[str, np.ndarray]] = {}
    speed: dict[str, dict] = {}
    for metric in metrics:
        started = time.perf_counter()
        reward = load_reward(metric, **options[metric])
        load_s = time.perf_counter() - started
        log.info("loaded %s in %.1f s", metric, load_s)
        scores[metric], seconds = {}, 0.0
        for method in methods:
            t0 = time.perf_counter()
            values = score_images(reward, [method.files[i] for i in indices], texts,
                                  options[metric].get("batch_size", 8))
            seconds += time.perf_counter() - t0
            scores[metric][method.name] = np.asarray(values, dtype=np.float64)
            log.info("%s %s: mean %.4f over %d images", metric, method.name, float(np.mean(values)), len(values))
        n = len(indices) * len(methods)
        speed[metric] = {"images": n, "seconds": round(seconds, 3), "images_per_s": round(n / max(seconds, 1e-9), 2),
                         "load_seconds": round(load_s, 2)}
        del reward
        gc.collect()
        _empty_cuda_cache()
    return scores, speed


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(scores: dict[str, dict[str, np.ndarray]], baseline: str, samples: int, seed: int) -> dict:
    """results[metric][method]: mean/std/n, and for non-baseline methods the paired comparison to `baseline`."""
    results: dict[str, dict] = {}
    for metric, by_method in scores.items():
        results[metric] = {}
        for name, values in by_method.items():
            row = describe(values)
            if name != baseline:
                row.update(paired_comparison(values, by_method[baseline], samples=samples, seed=seed))
            results[metric][name] = row
    return results


def prompt_map(prompts: Sequence[Prompt]) -> dict[int, str]:
    """{index: text} of the non-blank prompts."""
    return {p.index: p.text for p in prompts}
