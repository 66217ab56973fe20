"""Stage 6 logic: find the method folders, pair images with prompts by index (checked against batch inference's
manifest), score them, summarise, and write the outputs."""
from __future__ import annotations

import csv
import gc
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from . import methods as method_names
from .errors import UserError, one_line
from .io import atomic_write_json
from .prompts import Prompt, normalize_prompt, read_prompts
from .cli import SEED_RULES, setting
from .report import NOTES, csv_name, write_html, write_plots, write_scores_csv
from .rewards.base import (PLUGIN_HELP, available_rewards, check_scores, is_reward_name, load_reward, metric_names,
                           reward_factory)
from .rewards.hpsv2 import ARCHITECTURE, CHECKPOINTS
from .runs import check_writable_dir
from .runtime import DEVICE_HELP, DTYPE_CHOICES, get_logger, resolve_device
from .stats import describe, paired_comparison

log = get_logger(__name__)

IMAGE_NAME = re.compile(r"^(\d+)\.png$", re.IGNORECASE)
MANIFEST = "manifest.csv"  # batch inference's index -> prompt record, beside the method folders


@dataclass
class Method:
    """One method's image folder and its images by prompt index."""

    name: str
    folder: Path
    files: dict[int, Path] = field(default_factory=dict)


@dataclass
class Metric:
    """A reward to score with: its name in the outputs, the name `load_reward` takes, and its options."""

    name: str
    reward: str
    options: dict = field(default_factory=dict)  # path, device, dtype, batch_size (+ the reward's own)


METRIC_HELP = f"choose from {', '.join(available_rewards())} or {PLUGIN_HELP}"


@dataclass
class RewardConfig:
    """The rewards that score the images, and how they load and run (stage 6's reward flags)."""

    metrics: list[str] = setting(help=f"reward models, e.g. --metrics hpsv2 pickscore: {METRIC_HELP}",
                                 default_factory=lambda: ["hpsv2"], valid=is_reward_name, valid_help=METRIC_HELP,
                                 metavar="METRIC")
    hps_version: str = setting("v2.1", "HPSv2 checkpoint version", choices=sorted(CHECKPOINTS))
    hps_checkpoint: str | None = setting(None, "local HPS_v2*.pt checkpoint (same as --reward_path hpsv2=PATH; "
                                         "default: download the --hps_version's from the hub repo xswu/HPSv2)")
    hps_model: str = setting(ARCHITECTURE, "open_clip architecture of the HPS checkpoint: a model name or a path to "
                             "an open_clip model-config .json")
    reward_path: list[str] | None = setting(None, "local model file/folder (or hub id) for a metric, e.g. "
                                            "pickscore=/models/PickScore_v1 or toy_attributes=PATH; repeatable",
                                            append=True, metavar="METRIC=PATH")
    batch_size: int = setting(8, "images per scorer forward pass", min=1)
    device: str = setting("auto", DEVICE_HELP)
    dtype: str = setting("auto", "scorer compute dtype: auto = float16 (autocast) on CUDA, float32 elsewhere",
                         choices=["auto", *DTYPE_CHOICES])

    def build(self, device) -> list["Metric"]:
        """The `Metric`s to score with on `device` (flag errors are UserErrors): --hps_checkpoint means
        --reward_path hpsv2=..., and HPSv2 gets --hps_version and --hps_model."""
        metrics = build_metrics(self.metrics, self.reward_path, device, None if self.dtype == "auto" else self.dtype,
                                self.batch_size)
        for metric in metrics:
            if metric.reward == "hpsv2":
                if self.hps_checkpoint:
                    if metric.options["path"] not in (None, self.hps_checkpoint):
                        raise UserError("--hps_checkpoint and --reward_path hpsv2=... disagree: pass only one")
                    metric.options["path"] = self.hps_checkpoint
                metric.options.update(version=self.hps_version, architecture=self.hps_model)
        return metrics

    def record(self, device) -> dict:
        """summary.json's settings of the scorers."""
        return {"hps_version": self.hps_version if "hpsv2" in self.metrics else None, "device": str(device),
                "dtype": self.dtype, "batch_size": self.batch_size}


@dataclass
class EvaluationJob:
    """Everything stage 6 needs: scripts/evaluate_hps.py's flags are its fields and its RewardConfig's."""

    prompt_file: str = setting(help="the prompt file batch inference used (.txt one per line, or .csv/.tsv); image "
                               "{index}.png belongs to the prompt on 0-based line/row index")
    prompt_column: str | None = setting(None, "column of a .csv/.tsv prompt file (default: the first of prompt, "
                                        "caption, text)")
    image_base_dir: str = setting("./inference_output/", "folder holding the *_output method folders (and "
                                  "manifest.csv) written by batch inference")
    results_dir: str = setting("./results/", "where the CSV, summary.json, plots and report.html go (created; "
                               "existing files of the same names are replaced)")
    methods: list[str] | None = setting(None, f"methods to compare ({method_names.METHOD_HELP}; folder "
                                        "{name}_output or {name}), e.g. --methods standard gnsnet (default: every "
                                        "*_output folder that holds images)", metavar="METHOD",
                                        valid=lambda m: method_names.is_method(method_names.method_of_folder(m) or m),
                                        valid_help=method_names.METHOD_HELP)
    baseline: str = setting("standard", "the method every other method is compared with")
    rewards: RewardConfig = setting(default_factory=RewardConfig)
    bootstrap_samples: int = setting(10000, "bootstrap resamples for the 95%% CI", min=1)
    seed: int = setting(0, "seed of the bootstrap", **SEED_RULES)
    no_progress: bool = setting(False, "no progress bar while scoring")  # else a bar per metric


def find_methods(base_dir: str | Path, methods: Sequence[str] | None, baseline: str) -> list[Method]:
    """The method folders under `base_dir`: `{name}_output` (or `{name}` itself), baseline first."""
    base = Path(base_dir)
    if not base.is_dir():
        raise UserError(f"--image_base_dir {base} is not a folder: pass the output folder of batch inference")
    if methods:
        found = []
        for name in methods:
            name = method_names.method_of_folder(name) or name
            candidates = (base / method_names.folder(name), base / name)
            folder = next((f for f in candidates if f.is_dir()), None)
            if folder is None:
                raise UserError(f"--methods {name}: neither {candidates[0]} nor {candidates[1]} is a folder")
            found.append(Method(name, folder))
    else:
        found = [Method(method_names.method_of_folder(d.name), d) for d in sorted(base.iterdir())
                 if d.is_dir() and method_names.method_of_folder(d.name)]
        if not found:
            raise UserError(f"no *{method_names.FOLDER_SUFFIX} folders in {base}: pass the batch-inference output "
                            "folder as --image_base_dir or name the folders with --methods")
    names = [m.name for m in found]
    if len(set(names)) != len(names):
        raise UserError(f"--methods names a method twice: {', '.join(names)}")
    if baseline not in names:
        raise UserError(f"no folder for the baseline method {baseline!r} ({base / method_names.folder(baseline)}); "
                        f"found {', '.join(names)}: pass --baseline or --methods")
    return sorted(found, key=lambda m: (m.name != baseline, method_names.order_key(m.name)))


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


def read_manifest(path: Path) -> dict[str, tuple[int, str]]:
    """{image path relative to the manifest's folder: (index, prompt)} from batch inference's manifest.csv."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if not {"index", "prompt"} <= set(fields) or not {"file", "method"} & set(fields):
                raise UserError(f"{path} is not a batch-inference manifest (columns: {', '.join(fields) or 'none'}; "
                                "needs index, prompt and file or method): remove it or rerun batch inference")
            out = {}
            for line, row in enumerate(reader, start=2):
                index = int(row["index"])
                rel = row.get("file") or f"{method_names.folder(row.get('method') or '')}/{index}.png"
                out[rel] = (index, normalize_prompt(row["prompt"] or ""))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {path} ({one_line(e)}): remove it or rerun batch inference") from None
    except (TypeError, ValueError):
        raise UserError(f"{path} line {line}: index {row.get('index')!r} is not a number: remove the file or rerun "
                        "batch inference") from None
    return out


def _short(text: str, limit: int = 80) -> str:
    """A prompt quoted for an error message, cut to `limit` characters."""
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def check_manifest(base_dir: str | Path, methods: Sequence[Method], prompts: dict[int, str],
                   prompt_file: str | Path) -> bool:
    """Refuse images that batch inference made for other prompts than the prompt file's (per manifest.csv; the
    first differing index and both prompts named). Without a manifest, warn once and return False."""
    base = Path(base_dir)
    path = base / MANIFEST
    if not path.is_file():
        log.warning("no %s in %s (images not written by batch_inference.py?): cannot check that they were made "
                    "from the prompts of %s; pairing them by index only", MANIFEST, base, prompt_file)
        return False
    listed = read_manifest(path)
    first, unlisted = None, 0
    for method in methods:
        for index, file in method.files.items():
            entry = listed.get(file.relative_to(base).as_posix())
            if entry is None:
                unlisted += 1
            elif entry[1] != prompts[index] and (first is None or index < first[0]):
                first = (index, entry[1], file)
    if first is not None:
        index, theirs, file = first
        raise UserError(f"the images in {base} were made from other prompts than {prompt_file}: first at index "
                        f"{index}, {MANIFEST} has {_short(theirs)} ({file.name} of {file.parent.name}) but the "
                        f"prompt file has {_short(prompts[index])}: pass the --prompt_file batch inference used")
    if unlisted:
        log.warning("%d images are not listed in %s: their prompts are not checked", unlisted, path)
    return True


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
            raise UserError(f"cannot read image {path} ({one_line(e)}): delete it and rerun batch inference, or "
                            "move it away (its prompt is then reported missing)") from None


def load_image(path: Path):
    """Load an image fully as RGB; a bad file is a UserError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:
        raise UserError(f"cannot read image {path} ({one_line(e)})") from None


def score_images(reward, files: Sequence[Path], prompts: Sequence[str], batch_size: int, metric: str = "reward",
                 bar=None) -> list[float]:
    """Score images against their prompts, `batch_size` at a time (memory stays flat); the next batch's
    PNGs are decoded on worker threads while the current one is scored. Each batch must get one finite
    float per image."""
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
            batch_scores = reward.score(images, list(prompts[start:start + len(chunk)]))
            scores.extend(check_scores(batch_scores, len(images), metric))
            if bar is not None:
                bar.update(len(chunk))
    return scores


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr: live on a terminal, at most one refresh per 30 s in a log file."""
    from tqdm.auto import tqdm

    interactive = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="image", disable=not enabled, mininterval=0.5 if interactive else 30,
                maxinterval=10 if interactive else 60, dynamic_ncols=interactive)


def score_all(metrics: Sequence[Metric], methods: Sequence[Method], indices: Sequence[int], prompts: dict[int, str],
              progress: bool = True) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict]]:
    """scores[metric][method] (aligned with `indices`) and per-metric throughput; one model in memory at a time."""
    texts = [prompts[i] for i in indices]
    scores: dict[str, dict[str, np.ndarray]] = {}
    speed: dict[str, dict] = {}
    for metric in metrics:
        started = time.perf_counter()
        reward = load_reward(metric.reward, **metric.options)
        load_s = time.perf_counter() - started
        log.info("loaded %s in %.1f s", metric.name, load_s)
        scores[metric.name], seconds = {}, 0.0
        with progress_bar(len(indices) * len(methods), f"scoring {metric.name}", progress) as bar:
            for method in methods:
                t0 = time.perf_counter()
                values = score_images(reward, [method.files[i] for i in indices], texts,
                                      metric.options.get("batch_size", 8), metric.name, bar)
                seconds += time.perf_counter() - t0
                scores[metric.name][method.name] = np.asarray(values, dtype=np.float64)
                log.info("%s %s: mean %.4f over %d images", metric.name, method.name, float(np.mean(values)),
                         len(values))
        n = len(indices) * len(methods)
        speed[metric.name] = {"images": n, "seconds": round(seconds, 3),
                              "images_per_s": round(n / max(seconds, 1e-9), 2), "load_seconds": round(load_s, 2)}
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


def gather_images(job: EvaluationJob, prompts: dict[int, str]) -> tuple[list[Method], list[int], dict[str, list[int]]]:
    """The methods to compare with their images (checked against the manifest), the indices every method has,
    and per method the indices it lacks (logged)."""
    methods = [collect_images(m, prompts, job.prompt_file)
               for m in find_methods(job.image_base_dir, job.methods, job.baseline)]
    if job.methods is None:
        for m in [m for m in methods if not m.files and m.name != job.baseline]:
            log.warning("skipping %s: no {index}.png images in it", m.folder)
        methods = [m for m in methods if m.files or m.name == job.baseline]
    check_manifest(job.image_base_dir, methods, prompts, job.prompt_file)
    indices, missing = pair_images(methods, prompts)
    for name, lacks in missing.items():
        if lacks:
            log.warning("%s lacks %d of %d images (indices %s): evaluating the %d prompts every method has",
                        name, len(lacks), len(prompts), index_ranges(lacks), len(indices))
    return methods, indices, missing


def run_evaluation(job: EvaluationJob) -> dict:
    """Check every input and the results folder, score, and write the CSV, plots, report.html and summary.json
    (returned). Nothing is loaded or scored before the inputs and the results folder are known to be good."""
    device = resolve_device(job.rewards.device)
    metrics, settings = job.rewards.build(device), job.rewards.record(device)
    for metric in metrics:  # an unknown name or a bad FILE.py:NAME fails now, not after the checks below
        reward_factory(metric.reward)
    prompts = prompt_map(read_prompts(job.prompt_file, job.prompt_column))
    methods, indices, missing = gather_images(job, prompts)
    check_readable([m.files[i] for m in methods for i in indices])
    out = check_writable_dir(job.results_dir, "--results_dir")
    names = [m.name for m in metrics]
    log.info("evaluating %d prompts x %d methods (%s) with %s on %s", len(indices), len(methods),
             ", ".join(m.name for m in methods), ", ".join(names), settings["device"])

    scores, speed = score_all(metrics, methods, indices, prompts, not job.no_progress)
    results = summarize(scores, job.baseline, job.bootstrap_samples, job.seed)
    csv_path, html_path = out / csv_name(names), out / "report.html"
    write_scores_csv(csv_path, indices, prompts, scores, job.baseline)
    plots = write_plots(out, scores, job.baseline)
    missing_text = {m: index_ranges(v) for m, v in missing.items()}
    write_html(html_path, indices=indices, prompts=prompts, files={m.name: m.files for m in methods}, scores=scores,
               results=results, baseline=job.baseline, plots=plots, missing=missing_text,
               title=f"Golden noise evaluation: {', '.join(m.name for m in methods)} ({', '.join(names)})",
               subtitle=f"{len(indices)} of {len(prompts)} prompts from {job.prompt_file}; images from "
                        f"{job.image_base_dir}; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")
    summary = {
        "baseline": job.baseline, "methods": [m.name for m in methods], "metrics": names,
        "prompt_file": str(job.prompt_file), "image_base_dir": str(job.image_base_dir),
        "n_prompts": len(prompts), "n_evaluated": len(indices),
        "missing": missing, "results": results, "throughput": speed, "notes": NOTES,
        "settings": {**settings, "reward_paths": {m.name: m.options.get("path") for m in metrics},
                     "rewards": {m.name: m.reward for m in metrics},
                     "bootstrap_samples": job.bootstrap_samples, "seed": job.seed},
        "files": {"csv": csv_path.name, "html": html_path.name, "plots": [p.name for p in plots]},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


def parse_reward_paths(items: Sequence[str] | None, metrics: Sequence[str], names: Sequence[str],
                       flag: str = "--reward_path") -> dict[str, str]:
    """{metric as given in --metrics: path} from `METRIC=PATH` items (METRIC may be the metric's output name)."""
    by_name = {**dict(zip(metrics, metrics)), **dict(zip(names, metrics))}
    paths: dict[str, str] = {}
    for item in items or []:
        metric, sep, path = item.partition("=")
        if not sep or not metric or not path:
            raise UserError(f"{flag} {item!r}: write METRIC=PATH, e.g. pickscore=/models/PickScore_v1")
        if metric not in by_name:
            raise UserError(f"{flag} {item!r} names {metric!r}, which is not in --metrics {' '.join(metrics)}")
        paths[by_name[metric]] = path
    return paths


def build_metrics(metrics: Sequence[str], reward_paths: Sequence[str] | None, device, dtype: str | None,
                  batch_size: int) -> list[Metric]:
    """The `Metric`s of `--metrics` names (built-in or FILE.py:NAME) with their `--reward_path METRIC=PATH` items
    and the common options (device, dtype: None = auto, batch_size)."""
    if len(set(metrics)) != len(metrics):
        raise UserError(f"--metrics {' '.join(metrics)} names a metric twice: choose distinct metrics")
    names = metric_names(metrics)
    paths = parse_reward_paths(reward_paths, metrics, names)
    return [Metric(name, metric, {"path": paths.get(metric), "device": device, "dtype": dtype,
                                  "batch_size": batch_size}) for metric, name in zip(metrics, names)]


