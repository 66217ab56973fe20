"""Stage 5: the sharded, resumable batch runner behind `scripts/batch_inference.py`."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..diffusion import latent_shape, sample_images, seeded_noise
from ..errors import UserError
from ..io import atomic_save_image, atomic_torch_save, atomic_write_json, atomic_write_text
from ..prompts import read_prompts
from ..runtime import get_logger
from .api import DEFAULT_NUM_GEN_STEPS, GoldenNoise, _sync, golden_config_from, oracle_noise

logger = get_logger(__name__)

METHODS = ("standard", "gnsnet", "oracle")
MANIFEST_FIELDS = ("index", "prompt", "seed", "method", "file", "seconds", "noise_seconds", "sampling_seconds")


@dataclass
class BatchJob:
    """Everything the batch runner needs; the CLI fills it from its flags."""

    prompt_file: str
    output_base_dir: str
    methods: list[str]
    start_seed: int = 0
    batch_size: int = 4
    num_gen_steps: int | None = None
    num_inference_steps: int = 30
    guidance_scale: float = 5.5
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    save_noise: bool = False
    prompt_column: str | None = None
    golden_overrides: dict = field(default_factory=dict)  # schedule_steps / *_guidance_scale flags (None = unset)
    settings: dict = field(default_factory=dict)          # the CLI's flags, recorded in batch_settings.json


def method_dir(method: str) -> str:
    """Output folder of a method: standard_output, gnsnet_output or oracle_output."""
    return f"{method}_output"


def global_batches(items: Sequence, batch_size: int) -> list[list]:
    """Split into global batches items[kB:(k+1)B]; every process sees the same list."""
    return [list(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]


def my_batches(batches: Sequence, process_index: int, num_processes: int) -> list:
    """Round-robin share of the global batches, so a sample's batch never depends on the process count."""
    return list(batches[process_index::num_processes])


def _read_manifest_rows(out: Path) -> list[dict]:
    """Rows of an existing manifest.csv, then of per-process parts (later records win on merge)."""
    rows = []
    manifest = out / "manifest.csv"
    if manifest.is_file():
        with open(manifest, encoding="utf-8", newline="") as f:
            rows.extend(csv.DictReader(f))
    parts = out / ".manifest_parts"
    if parts.is_dir():
        for part in sorted(parts.glob("*.jsonl"), key=lambda p: p.stat().st_mtime):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line torn by an interrupt
                    continue
    return rows


def merge_manifest(out: Path, methods_order: Sequence[str] = METHODS) -> list[dict]:
    """Write manifest.csv from the old manifest and every part, keeping rows whose image exists; drop parts."""
    merged: dict[tuple[int, str], dict] = {}
    for row in _read_manifest_rows(out):
        key = (int(row["index"]), row["method"])
        if (out / row["file"]).is_file():
            merged[key] = {k: row.get(k, "") for k in MANIFEST_FIELDS}
    order = {m: i for i, m in enumerate(methods_order)}
    rows = [merged[k] for k in sorted(merged, key=lambda k: (k[0], order.get(k[1], len(order)), k[1]))]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "manifest.csv", buf.getvalue())
    parts = out / ".manifest_parts"
    if parts.is_dir():
        for part in parts.glob("*.jsonl"):
            part.unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            pass
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: Sequence[dict], stats: Sequence[dict], job: BatchJob, num_processes: int,
              num_prompts: int, num_gen_steps: int) -> dict:
    """The run's summary: counts, and mean per-image time of the noise (RNN rollout / oracle) and the sampling."""
    per_method = {}
    for method in job.methods:
        generated = sum(s["generated"].get(method, 0) for s in stats)
        skipped = sum(s["skipped"].get(method, 0) for s in stats)
        noise = [t for s in stats for t in s["noise_seconds"].get(method, [])]
        sampling = [t for s in stats for t in s["sampling_seconds"].get(method, [])]
        mean_noise, mean_sampling = _mean(noise), _mean(sampling)
        per_method[method] = {
            "images": sum(1 for r in rows if r["method"] == method),
            "generated_this_run": generated,
            "skipped_existing": skipped,
            "mean_noise_seconds_per_image": mean_noise,
            "mean_sampling_seconds_per_image": mean_sampling,
            "noise_over_sampling": (mean_noise / mean_sampling) if mean_noise is not None and mean_sampling else None,
        }
    return {"num_prompts": num_prompts, "num_processes": num_processes, "batch_size": job.batch_size,
            "num_gen_steps": num_gen_steps, "methods": per_method}


# settings that shape every image: a rerun into the same folder must keep them (methods may be added)
RESUME_KEYS = ("base_model_id_used", "revision", "variant", "dtype", "scheduler", "num_inference_steps",
               "guidance_scale", "negative_prompt", "height", "width", "start_seed", "num_gen_steps", "golden",
               "rnn_weights_path")


def check_resume_compatible(path: Path, new: dict) -> None:
    """Refuse to add images to a folder made with other settings, naming every difference."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): remove it or choose another --output_base_dir") from None
    fresh = json.loads(json.dumps(new, default=str))
    diffs = [f"{k}: {old.get(k)!r} -> {fresh.get(k)!r}" for k in RESUME_KEYS
             if old.get(k) != fresh.get(k)
             and not (k in ("golden", "rnn_weights_path") and None in (old.get(k), fresh.get(k)))]
    if diffs:
        raise UserError(f"{path.parent} holds images made with other settings ({'; '.join(diffs)}): rerun with "
                        "the same flags or choose another --output_base_dir")


def run_batch(job: BatchJob, pipe, gn: GoldenNoise | None, state, prompts=None) -> dict | None:
    """Generate every missing image of `job` on this process's share of the global batches.

    Resumable: a batch whose images of a method all exist is skipped; a batch with some missing is recomputed
    whole (same batch composition, so the same pixels) and only the missing files are written. Returns the
    summary on the main process (None elsewhere) after merging the manifest. `prompts` defaults to
    `read_prompts(job.prompt_file, job.prompt_column)`."""
    from tqdm.auto import tqdm

    out = Path(job.output_base_dir)
    unknown = [m for m in job.methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown --methods {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if "gnsnet" in job.methods and gn is None:
        raise UserError("--methods gnsnet needs --rnn_weights_path (a trained RNN export)")
    if job.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {job.batch_size}")
    prompts = prompts if prompts is not None else read_prompts(job.prompt_file, job.prompt_column)
    height = job.height or (gn.height if gn else None)
    width = job.width or (gn.width if gn else None)
    shape = latent_shape(pipe, height, width)
    if gn is not None:
        gn.check_pipeline(pipe, height, width)
    n = job.num_gen_steps or (gn.num_steps if gn else None) or DEFAULT_NUM_GEN_STEPS
    if gn is not None and gn.num_steps and n != gn.num_steps:
        logger.warning("--num_gen_steps %d differs from the %d steps of the RNN's training sequences", n, gn.num_steps)
    golden = golden_config_from(gn.run_config if gn else None, **job.golden_overrides) \
        if "oracle" in job.methods else None

    settings = {**job.settings, "num_gen_steps": n, "height": height, "width": width, "latent_shape": list(shape),
                "num_inference_steps": job.num_inference_steps, "guidance_scale": job.guidance_scale,
                "negative_prompt": job.negative_prompt, "start_seed": job.start_seed,
                "golden": golden.to_dict() if golden else None, "num_processes": state.num_processes,
                "scheduler_class": type(pipe.scheduler).__name__,
                "rnn_run_config": gn.run_config if gn else None, "rnn_model_config": gn.model_config if gn else None}
    check_resume_compatible(out / "batch_settings.json", settings)  # every process checks, so all fail alike
    state.wait_for_everyone()
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "batch_settings.json", settings)
    state.wait_for_everyone()

    batches = my_batches(global_batches(prompts, job.batch_size), state.process_index, state.num_processes)
    part = out / ".manifest_parts" / f"rank{state.process_index}-{os.getpid()}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    stats = {"generated": {}, "skipped": {}, "noise_seconds": {}, "sampling_seconds": {}}
    device = pipe.unet.device
    total = len(batches) * len(job.methods)
    bar = tqdm(total=total, desc=f"batches x methods (process {state.process_index})", unit="batch",
               disable=not state.is_main_process)
    with open(part, "a", encoding="utf-8") as part_file:
        for batch in batches:
            texts = [p.text for p in batch]
            seeds = [job.start_seed + p.index for p in batch]
            x_T = None
            for method in job.methods:
                files = [out / method_dir(method) / f"{p.index}.png" for p in batch]
                noises = [out / "noise" / method / f"{p.index}.pt" for p in batch]
                missing = [i for i in range(len(batch))
                           if not files[i].is_file() or (job.save_noise and not noises[i].is_file())]
                stats["skipped"][method] = stats["skipped"].get(method, 0) + len(batch) - len(missing)
                if not missing:
                    bar.update(1)
                    continue
                if x_T is None:
                    x_T = seeded_noise(seeds, shape)  # (B, C, H, W) float32, one generator per seed
                _sync(device)
                t0 = time.perf_counter()
                if method == "standard":
                    latents = x_T
                elif method == "gnsnet":
                    latents = gn.rollout(x_T, gn.text_embeddings(texts, pipe), n)[:, -1]
                else:
                    latents = oracle_noise(pipe, texts, x_T, n, golden, height, width)
                _sync(device)
                t1 = time.perf_counter()
                images = sample_images(pipe, texts, latents, job.num_inference_steps, job.guidance_scale,
                                       job.negative_prompt, height, width)
                _sync(device)
                t2 = time.perf_counter()
                noise_s, sample_s = (t1 - t0) / len(batch), (t2 - t1) / len(batch)
                for i in missing:
                    p = batch[i]
                    if job.save_noise:  # before the image: an existing image implies its noise is there
                        atomic_torch_save(latents[i].detach().float().cpu().clone(), noises[i])
                    atomic_save_image(images[i], files[i])
                    row = {"index": p.index, "prompt": p.text, "seed": seeds[i], "method": method,
                           "file": f"{method_dir(method)}/{p.index}.png", "seconds": round(noise_s + sample_s, 6),
                           "noise_seconds": round(noise_s, 6), "sampling_seconds": round(sample_s, 6)}
                    part_file.write(json.dumps(row) + "\n")
                    part_file.flush()
                    stats["generated"][method] = stats["generated"].get(method, 0) + 1
                    stats["noise_seconds"].setdefault(method, []).append(noise_s)
                    stats["sampling_seconds"].setdefault(method, []).append(sample_s)
                bar.update(1)
    bar.close()

    from accelerate.utils import gather_object

    all_stats = gather_object([stats])
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    rows = merge_manifest(out, job.methods)
    summary = summarize(rows, all_stats, job, state.num_processes, len(prompts), n)
    atomic_write_json(out / "summary.json", summary)
    return summary


