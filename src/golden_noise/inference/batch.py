"""Stage 5: the sharded, resumable batch runner behind `scripts/batch_inference.py`.

Layout of an output folder:
    {method}_output/{index}.png     one image per prompt and method (methods.folder: standard, gnsnet, direct, npnet,
                                    oracle)
    noise/{method}/{index}.pt       its initial latents (C, H, W), with --save_noise
    manifest.csv                    index, prompt, seed, method, file, unet_evals (denoiser rows per image: noise
                                    + sampling, counted by a hook)
    summary.json                    the images of every method in the folder
    batch_settings.json             every input and setting that shaped the images, and what they resolved to
    timings.csv                     index, method, seconds, noise_seconds, sampling_seconds (as each image was made)
    run.json                        this run: process count, task, device, output folder, RNN file path, what it
                                    made and skipped, and the mean per-image noise / sampling times of the folder
The first five are the results: two uninterrupted runs of the same command (any process count, any output folder)
write them byte-identical, and so does a run that resumed after a kill. The last two differ from run to run.
A rerun with the same prompts and settings resumes (methods may be added); any other rerun is refused.

Across machines: task i of K (`--num_shards K --shard_index i`, runs.Task; Slurm array defaults) makes global batches
i, i + K, ..., its processes dealing those round-robin. K tasks share the folder: each locks its own batches (a second
run of the same ones is refused), writes its own manifest parts, and writes the same batch_settings.json; the run
that finds every image there merges manifest.csv, timings.csv and summary.json (`--finalize` does that alone).
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..cli import SEED_RULES, check_fields, check_seeds, rerun_keys, setting
from ..diffusion import family_of, sample_images
from ..diffusion.base import ModelRows
from ..errors import UserError
from ..golden import GoldenConfig
from ..io import (BackgroundWriter, atomic_save_image, atomic_torch_save, atomic_write_json, atomic_write_text,
                  remove_stale_temps as remove_temp_files, tensor_file_intact)
from ..methods import LEARNED, METHODS, ONE_STEP, folder, order_key
from ..prompts import Prompt, prompt_fingerprint, read_prompts
from ..runs import (RunLock, Task, check_writable_dir, finalize_setting, keep_unused, num_shards_setting, read_settings,
                    refuse_mixed_rerun, shard_index_setting)
from ..runtime import distributed_state, get_logger, global_batches, on_main, package_versions, resolve_device, shard
from .api import GoldenNoise, _sync, golden_config_from, oracle_noise
from .config import (PREDICT_VARIANCE_HELP, PipelineSpec, SamplingConfig, flat_record, learned_keys, learned_record,
                     load_golden_noise, load_job_pipelines, load_one_step_models, pipeline_record,
                     resolve_num_gen_steps, rnn_record, sampling_record)
from .sampler import build_sampler

logger = get_logger(__name__)

MANIFEST_FIELDS = ("index", "prompt", "seed", "method", "file", "unet_evals")
TIMING_FIELDS = ("seconds", "noise_seconds", "sampling_seconds")  # timings.csv: index, method and these
SETTINGS_FILE = "batch_settings.json"
TIMINGS_FILE = "timings.csv"
RUN_FILE = "run.json"
# what differs from run to run of the same command: kept out of batch_settings.json (recorded in run.json)
RUN_KEYS = ("output_base_dir", "num_processes", "device", "device_used", "rnn_weights_file", "direct_weights_file",
            "npnet_weights_file", "num_shards", "shard_index")
SHARED_LOCK = ".shared.lock"  # held (waiting) while a run writes the folder's shared files: settings, manifest, summary
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class BatchJob:
    """Every prompt of a file, with each method: what stage 5 makes and where (the CLI fills it from its flags).

    A field's `rerun` keys are batch_settings.json's record of it that a rerun into the same folder must keep
    (`loaded`: known once the models are loaded; `when_unused`: None when this run's methods do not use it, then
    the earlier run's values are kept). The batch size is one of them: a sample's pixels depend on its batch-mates
    in the last bits."""

    prompt_file: str = setting(rerun="prompt_fingerprint")
    output_base_dir: str = setting("./inference_output", "folder of the {method}_output/ folders")
    methods: list[str] = setting(default_factory=lambda: ["standard", "gnsnet"])  # --methods may grow on a rerun
    prompt_column: str | None = setting(None, "column of a .csv/.tsv prompt file (default: prompt or caption)")
    start_seed: int = setting(0, "seed of prompt index i = start_seed + i (default: %(default)s)", rerun=True,
                              **SEED_RULES)
    batch_size: int = setting(4, "prompts per pipeline call", min=1, rerun=True)
    save_noise: bool = setting(False, "also save each method's initial latents as noise/{method}/{index}.pt (C, H, "
                               "W)")
    rnn_weights_path: str | None = setting(None, "trained RNN export (needed for gnsnet): .safetensors, .json, their "
                                           "stem, the run dir, the seed's rnn_v3_model_final.pth (= that export), or "
                                           "a hub repo id owner/name",
                                           rerun=("rnn_sha256", "rnn_config_sha256"),  # the export's identity
                                           when_unused=("rnn_weights_file", "rnn_sha256", "rnn_config_sha256",
                                                        "rnn_model_config", "rnn_run_config"))
    predict_variance: bool = setting(False, PREDICT_VARIANCE_HELP)
    direct_weights: str | None = setting(None, "trained direct-model export (needed for direct: "
                                         "train_rnn_model_v3.py --model_type DirectNoiseModel)",
                                         rerun=("direct_sha256", "direct_config_sha256"),
                                         when_unused=learned_keys("direct"))
    npnet_weights: str | None = setting(None, "NPNet weights (needed for npnet): an export of train_rnn_model_v3.py "
                                        "--model_type NPNet, or NPNet's released SDXL checkpoint (.pth, read with "
                                        "weights_only=True)", rerun=("npnet_sha256", "npnet_config_sha256"),
                                        when_unused=learned_keys("npnet"))
    num_gen_steps: int | None = setting(None, "n: RNN rollout / oracle steps (default: num_steps of the RNN's "
                                        "training data, else 10)", min=1, rerun="num_gen_steps_used",
                                        when_unused="num_gen_steps_used")
    golden_overrides: dict = setting(default_factory=dict, rerun="golden", when_unused="golden")  # GoldenConfig
    # fields given for the oracle (else the RNN's)
    sampling: SamplingConfig = setting(default_factory=SamplingConfig)
    pipeline: PipelineSpec = setting(default_factory=PipelineSpec)
    num_shards: int | None = num_shards_setting("the prompts' global batches (into one --output_base_dir)",
                                                "batches i, i + K, i + 2K, ...")
    shard_index: int | None = shard_index_setting()
    finalize: bool = finalize_setting("make nothing: merge manifest.csv and write summary.json of a folder whose "
                                      "images are all there, given the job's --prompt_file (the run that finds them "
                                      "all does this itself); name the missing images otherwise")


# What a rerun into an existing folder must keep (batch_settings.json's keys; --methods may grow), derived from the
# fields' metadata: known before loading, known once loaded, and None when unused (then the earlier run's kept)
EARLY_KEYS = rerun_keys(BatchJob)
LOADED_KEYS = rerun_keys(BatchJob, "loaded")
KEPT_WHEN_UNUSED = rerun_keys(BatchJob, "when_unused")


@dataclass
class BatchRun:
    """A prepared run: its job, prompts, models, resolved settings and this process's place."""

    job: BatchJob
    state: Any
    out: Path
    prompts: list[Prompt]
    gn: GoldenNoise | None
    settings: dict
    golden: GoldenConfig | None = None
    others: dict = field(default_factory=dict)  # {direct / npnet: GoldenNoise} of the one-step methods asked for
    pipe: Any = None     # the base pipeline: the RNN's text embedding and the oracle
    sampler: Any = None  # the pipeline that samples the images (the base one unless a separate sampler is asked)
    task: Task = Task()  # which global batches this run makes (all, unless K separate runs share the job)


def check_batch(job: BatchJob) -> None:
    """Validate the job's flags before any work."""
    unknown = [m for m in job.methods if m not in METHODS]
    if unknown:
        raise UserError(f"unknown --methods {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    for method, (_, flag) in LEARNED.items():
        if method in job.methods and not getattr(job, flag):
            raise UserError(f"--methods {method} needs --{flag} (a trained export); or drop {method}")
    check_fields(job)
    job.sampling.check()
    golden_config_from(None, **job.golden_overrides)  # refuses golden-step values out of range, naming the flag


def run_batch(job: BatchJob, state=None, pipe=None, sampler=None, gn: GoldenNoise | None = None,
              others: dict | None = None) -> dict | None:
    """Generate every missing image of `job` on this process's share of the global batches.

    Resumable: a batch whose images of a method are all there (and intact) is skipped; a batch with some missing
    is recomputed whole (same batch composition, so the same pixels) and only the missing files are written.
    Returns the summary on the main process (None elsewhere) after merging the manifest. `pipe`: a pipeline
    already loaded as `job.pipeline` says (the sweep runs many jobs on one), `sampler` the one built for
    `job.sampling` from it (None: built here), `gn` the RNN of `job.rnn_weights_path` and `others` the one-step
    models of direct / npnet ({method: GoldenNoise}; None: loaded here).
    `job.num_shards`/`shard_index` (runs.Task): this run makes only its task's batches; the summary is None-free only
    once every image is there (else it says what is missing). `job.finalize`: `finalize_batch`."""
    state = state if state is not None else distributed_state()
    task = Task.resolve(job.num_shards, job.shard_index)  # a bad --shard_index fails before anything loads
    if job.finalize:
        return finalize_batch(job) if state.is_main_process else None
    run = prepare_batch(job, state, gn, others)
    run.task = task
    run.settings.update(num_shards=task.count, shard_index=task.index)  # run keys (run.json), not the settings'
    run.settings.pop("finalize", None)
    lock = RunLock(run.out, "--output_base_dir", task.shards(len(global_batches(run.prompts, job.batch_size))),
                   what="batch")  # this task's batches: the other tasks of the job run beside it
    on_main(state, lock.acquire)
    if state.is_main_process:
        logger.info("Running batch inference: %d prompts x methods %s, batch %d, %d process(es), into %s%s",
                    len(run.prompts), " ".join(job.methods), job.batch_size, state.num_processes, run.out,
                    f", task {task.index} of {task.count} (global batches {task.index}, {task.index + task.count}, "
                    f"...)"
                    if task.count > 1 else "")
    try:
        load_pipeline_for(run, pipe, sampler)
        stats = generate(run)
        return finish(run, stats)
    finally:
        lock.release()


def prepare_batch(job: BatchJob, state, gn: GoldenNoise | None = None, others: dict | None = None) -> BatchRun:
    """Check the job, read the prompts, load the RNN (unless given) and refuse a rerun with other inputs, before any
    pipeline."""
    job.methods = list(dict.fromkeys(job.methods))
    check_batch(job)
    prompts = read_prompts(job.prompt_file, job.prompt_column)
    check_seeds("--start_seed", job.start_seed, prompts[-1].index)
    out = check_writable_dir(job.output_base_dir, "--output_base_dir")  # before any model is loaded
    device = state.device if job.pipeline.device == "auto" else resolve_device(job.pipeline.device)
    if gn is None:
        gn = load_golden_noise(job.rnn_weights_path, device, job.predict_variance)
    others = load_one_step_models(job.methods, {m: getattr(job, LEARNED[m][1]) for m in ONE_STEP}, device, others)
    ref = gn or next(iter(others.values()), None)  # the export that sets the defaults (model id, size, n)
    noisy = [m for m in job.methods if m != "standard"]
    golden = golden_config_from(ref.run_config if ref else None, **job.golden_overrides) \
        if "oracle" in job.methods else None
    job.sampling.log_guidance()
    n = resolve_num_gen_steps(job.num_gen_steps, ref) if noisy else None
    for method, model in others.items():
        if n != model.predicts_step:
            raise UserError(f"--methods {method}: its model predicts x'_{model.predicts_step} in one forward, but this "
                            f"run's n is {n} (--num_gen_steps, else the first export's training data): pass "
                            f"--num_gen_steps {model.predicts_step}, or an export trained on {n}-step sequences")
    settings = {**flat_record(job), "prompt_fingerprint": prompt_fingerprint(prompts), "num_prompts": len(prompts),
                "num_processes": state.num_processes, **pipeline_record(job.pipeline, ref, device),
                "num_gen_steps_used": n, "golden": golden.to_dict() if golden else None,
                **rnn_record(gn if "gnsnet" in job.methods else None)}
    for method in ONE_STEP:
        settings.update(learned_record(method, others.get(method)))
    refuse_mixed_rerun(out / SETTINGS_FILE, settings, EARLY_KEYS, "--output_base_dir", "images",
                       lenient=KEPT_WHEN_UNUSED)  # every process checks, so all fail alike
    return BatchRun(job, state, out, prompts, gn, settings, golden, others=others)


def load_pipeline_for(run: BatchRun, pipe=None, sampler=None) -> None:
    """Load the pipeline and its sampler (or take `pipe` and `sampler`, loaded from the same spec), refuse a rerun
    whose resolved sizes differ, then (main process) remove stale temporary files and record the settings."""
    device = run.settings["device_used"]
    if pipe is not None:  # the sweep's pipeline, loaded once from the same spec
        run.pipe, spec = pipe, run.job.pipeline
        run.sampler = sampler if sampler is not None else build_sampler(
            pipe, run.job.sampling, run.settings, device, spec.enable_model_cpu_offload, spec.enable_vae_slicing,
            spec.enable_vae_tiling)
    else:
        if run.state.is_main_process:
            logger.info("loading %s (%s on %s)", run.settings["base_model_id_used"], run.settings["dtype_used"],
                        device)
        run.pipe, run.sampler = load_job_pipelines(run.job.pipeline, run.job.sampling, run.settings, device)
    run.settings.update(sampling_record(run.pipe, run.job.sampling, run.gn, run.sampler, others=run.others.values()),
                        versions=package_versions())
    path = run.out / SETTINGS_FILE
    refuse_mixed_rerun(path, run.settings, LOADED_KEYS, "--output_base_dir", "images")
    run.state.wait_for_everyone()
    if run.state.is_main_process:
        with shared_files(run.out):  # the other tasks of the job write the same settings
            old = read_settings(path, "--output_base_dir") or {}
            run.settings = keep_unused(run.settings, old, KEPT_WHEN_UNUSED)
            run.settings["methods"] = sorted({*old.get("methods", []), *run.job.methods}, key=order_key)
            remove_stale_temps(run.out, task_indices(run))
            atomic_write_json(path, {k: v for k, v in run.settings.items() if k not in RUN_KEYS})
    run.state.wait_for_everyone()


def shared_files(out: Path, flag: str = "--output_base_dir") -> RunLock:
    """The lock a run holds (waiting its turn) while it writes the files every task of the folder writes (stage 5's
    folder, or the sweep's: `flag` names its folder)."""
    return RunLock(out, flag, name=SHARED_LOCK, wait=True)


def task_indices(run: BatchRun) -> set[int]:
    """The prompt indices of this run's task's global batches."""
    return {p.index for batch in run.task.share(global_batches(run.prompts, run.job.batch_size)) for p in batch}


def remove_stale_temps(out: Path, indices: set[int] | None = None) -> int:
    """Delete the temporary files a killed run left in the output folders: with `indices`, only those of these
    prompts' images and noises (other tasks may be writing theirs). Call it holding `shared_files(out)`: the
    folder's own files are written under it, so a temporary one is a killed run's."""
    names = None if indices is None else {str(i) for i in indices}
    mine = None if names is None else (lambda name: name.partition(".")[0] in names)
    stale = (remove_temp_files([*(out / folder(m) for m in METHODS), *(out / "noise" / m for m in METHODS)], mine)
             + remove_temp_files([out]))
    if stale:
        logger.info("removed %d temporary file(s) an interrupted run left behind", stale)
    return stale


def intact_png(path: Path) -> bool:
    """True for a PNG that is whole: its signature, every chunk's CRC, IEND last with nothing after it, and its
    pixels decode (zlib's own checksum included). A truncated, corrupted or unreadable image counts as missing."""
    from PIL import Image

    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    if not data.startswith(_PNG_SIGNATURE):
        return False
    pos, chunk = len(_PNG_SIGNATURE), b""
    while chunk != b"IEND":
        if pos + 12 > len(data):
            return False
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")  # length, type, data, CRC of type + data
        if end > len(data) or zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return False
        chunk, pos = data[pos + 4:pos + 8], end
    if pos != len(data):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # PIL raises many types for damaged data (OSError, SyntaxError, ValueError, zlib.error)
        return False
    return True


def generate(run: BatchRun) -> dict:
    """Make the missing images of this process's share of the global batches; returns its counts (made, skipped)."""
    from tqdm.auto import tqdm

    state, task = run.state, run.task
    batches = shard(task.share(global_batches(run.prompts, run.job.batch_size)), state.process_index,
                    state.num_processes)  # the task's batches first (machines), then this process's
    part = run.out / ".manifest_parts" / f"task{task.index}-rank{state.process_index}-{os.getpid()}.jsonl"
    part.parent.mkdir(parents=True, exist_ok=True)
    stats = {"generated": {}, "skipped": {}}
    recorded = recorded_images(run.out)
    bar = tqdm(total=len(batches) * len(run.job.methods), desc=f"batches x methods (process {state.process_index})",
               unit="batch", disable=not state.is_main_process)
    with open(part, "a", encoding="utf-8") as part_file:
        writer = ImageWriter(part_file)
        try:
            for batch in batches:
                generate_batch(run, batch, writer, stats, bar, recorded)
        finally:
            writer.close()  # every image already made reaches the disk (and the manifest part), also on Ctrl-C
    bar.close()
    return stats


class ImageWriter:
    """Saves each batch's files on one background thread, in order, so PNG encoding overlaps the next batch's
    denoising; a manifest row is written only once its image (and noise) is on disk. At most two batches wait."""

    def __init__(self, part_file):
        self.part_file, self.writer = part_file, BackgroundWriter(max_pending=2, drain_to=2)

    def submit(self, items: list[tuple]) -> None:
        """items: (noise tensor or None, noise path, PIL image, image path, manifest row) per image."""
        self.writer.submit(self._write, items)

    def _write(self, items: list[tuple]) -> None:
        for noise, noise_path, image, path, row in items:
            if noise is not None:  # before the image: an intact image implies its noise is there
                atomic_torch_save(noise, noise_path)
            atomic_save_image(image, path)
            self.part_file.write(json.dumps(row) + "\n")
            self.part_file.flush()

    def close(self) -> None:
        self.writer.close()


def recorded_images(out: Path) -> set[tuple[int, str]]:
    """(index, method) of every image a manifest row (merged or in a per-process part) records. An image on disk
    without its row was cut off by a kill between the two writes: it counts as missing and is made again."""
    return {(int(row["index"]), row["method"]) for row in _read_manifest_rows(out)}


def generate_batch(run: BatchRun, batch: list[Prompt], writer: ImageWriter, stats: dict, bar,
                   recorded: set[tuple[int, str]]) -> None:
    """Every method's missing images of one global batch (the whole batch is computed, so pixels never depend
    on which of its images were missing). Missing: not an intact PNG (`intact_png`: decoded, every CRC checked), no
    manifest row, or (with --save_noise) no intact noise file (io.tensor_file_intact: a fast zip-structure check)."""
    job, out, s = run.job, run.out, run.settings
    texts = [p.text for p in batch]
    seeds = [job.start_seed + p.index for p in batch]
    x_T = None
    for method in job.methods:
        files = [out / folder(method) / f"{p.index}.png" for p in batch]
        noises = [out / "noise" / method / f"{p.index}.pt" for p in batch]
        missing = [i for i, p in enumerate(batch)
                   if not intact_png(files[i]) or (p.index, method) not in recorded
                   or (job.save_noise and not tensor_file_intact(noises[i]))]
        stats["skipped"][method] = stats["skipped"].get(method, 0) + len(batch) - len(missing)
        if not missing:
            bar.update(1)
            continue
        if x_T is None:
            x_T = family_of(run.pipe).initial_noise(seeds, s["latent_shape"])  # (B, C, H, W) float32, per seed
        device = family_of(run.pipe).device
        _sync(device)
        t0 = time.perf_counter()
        # the cost, counted: denoiser rows of the noise (oracle) and of the sampling (base and sampler)
        with ModelRows(family_of(run.pipe).denoiser, family_of(run.sampler).denoiser) as rows:
            latents = method_latents(run, method, texts, x_T)  # (B, C, H, W)
            _sync(device)
            t1 = time.perf_counter()
            images = sample_images(run.sampler, texts, latents, job.sampling.num_inference_steps,
                                   job.sampling.guidance_scale, job.sampling.negative_prompt, s["height_used"],
                                   s["width_used"])
            _sync(device)
        t2 = time.perf_counter()
        noise_s, sample_s = (t1 - t0) / len(batch), (t2 - t1) / len(batch)
        items = []
        for i in missing:
            p = batch[i]
            noise = latents[i].detach().float().cpu().clone() if job.save_noise else None  # (C, H, W)
            row = {"index": p.index, "prompt": p.text, "seed": seeds[i], "method": method,
                   "file": f"{folder(method)}/{p.index}.png", "seconds": round(noise_s + sample_s, 6),
                   "noise_seconds": round(noise_s, 6), "sampling_seconds": round(sample_s, 6),
                   "unet_evals": rows.rows / len(batch)}
            items.append((noise, noises[i], images[i], files[i], row))
            stats["generated"][method] = stats["generated"].get(method, 0) + 1
        writer.submit(items)
        bar.update(1)


def method_latents(run: BatchRun, method: str, texts: list[str], x_T):
    """A method's initial latents for a batch: x_T (standard), the RNN's rollout (gnsnet), a one-step model's
    prediction (direct, npnet) or the oracle's."""
    n = run.settings["num_gen_steps_used"]
    if method == "standard":
        return x_T
    if method in LEARNED:
        model = run.gn if method == "gnsnet" else run.others[method]
        return model.rollout(x_T, model.text_embeddings(texts, run.pipe), n)[:, -1]
    return oracle_noise(run.pipe, texts, x_T, n, run.golden, run.settings["height_used"], run.settings["width_used"])


def finish(run: BatchRun, stats: dict) -> dict | None:
    """Gather every process's stats; on the main process, once every image of the job is there (the other tasks'
    too), merge the manifest and timings and write summary.json and run.json. Returns (main process) the summary
    with this run's record merged into each method's entry; while other tasks' images are missing, this run's
    record with `missing` (manifest parts stay for the run that completes the folder, or --finalize)."""
    from accelerate.utils import gather_object

    all_stats = gather_object([stats])
    run.state.wait_for_everyone()
    if not run.state.is_main_process:
        return None
    with shared_files(run.out):  # the job's last two tasks may finish at once: one merges after the other
        missing = missing_images(run.out, run.prompts, run.job.batch_size, run.job.methods)
        if missing:
            record = run_record([], all_stats, run.job.methods, run.settings)
            return {**{k: v for k, v in record.items() if k != "methods"}, "missing": missing,
                    "num_prompts": len(run.prompts),
                    "methods": {m: {"images": None, **record["methods"][m]} for m in run.job.methods}}
        rows, timings = merge_manifest(run.out)
        summary = summarize(rows, len(run.prompts), run.job.batch_size, run.settings["num_gen_steps_used"])
        record = run_record(timings, all_stats, list(summary["methods"]), run.settings)
        atomic_write_json(run.out / "summary.json", summary)
        atomic_write_json(run.out / RUN_FILE, record)
    return {**summary, **{k: v for k, v in record.items() if k != "methods"},
            "methods": {m: {**summary["methods"][m], **record["methods"][m]} for m in summary["methods"]}}


def missing_images(out: Path, prompts: Sequence[Prompt], batch_size: int, methods: Sequence[str]) -> list[dict]:
    """{"batch", "index", "method"} of each image of `methods` that no manifest row (merged or a part) records with
    its file there: the images a folder's tasks have yet to make."""
    present = {_key(row) for row in _read_manifest_rows(out) if (out / row["file"]).is_file()}
    return [{"batch": b, "index": p.index, "method": m}
            for b, batch in enumerate(global_batches(prompts, batch_size)) for p in batch for m in methods
            if (p.index, m) not in present]


def describe_missing(missing: Sequence[dict], total: int) -> str:
    """'N of M images (global batches b1, b2, ...; e.g. gnsnet_output/5.png)': what a folder's tasks have yet to
    make, for one line."""
    batches = sorted({m["batch"] for m in missing})
    first = missing[0]
    return (f"{len(missing)} of {total} images are missing (global batch(es) {', '.join(map(str, batches[:10]))}"
            f"{', ...' if len(batches) > 10 else ''}; e.g. {folder(first['method'])}/{first['index']}.png)")


def finalize_batch(job: BatchJob) -> dict:
    """--finalize: merge manifest.csv and timings.csv and write summary.json of a folder whose images (of every
    method its batch_settings.json lists) are all there; else a UserError naming the missing ones. `job`'s
    prompt file must be the folder's."""
    out = Path(job.output_base_dir)
    settings = read_settings(out / SETTINGS_FILE, "--output_base_dir")
    if settings is None:
        raise UserError(f"--finalize: {out} holds no stage-5 images ({SETTINGS_FILE} missing): run the job first")
    prompts = read_prompts(job.prompt_file, job.prompt_column)
    if prompt_fingerprint(prompts) != settings.get("prompt_fingerprint"):
        raise UserError(f"--finalize: --prompt_file {job.prompt_file} holds other prompts than those of {out}: give "
                        "the job's own --prompt_file (and --prompt_column)")
    methods, batch_size = settings["methods"], int(settings["batch_size"])
    with shared_files(out):
        missing = missing_images(out, prompts, batch_size, methods)
        if missing:
            raise UserError(f"--finalize: {describe_missing(missing, len(prompts) * len(methods))} in {out}: rerun "
                            "the task(s) that make them (the same command), then --finalize again")
        rows, _ = merge_manifest(out)
        summary = summarize(rows, len(prompts), batch_size, settings.get("num_gen_steps_used"))
        atomic_write_json(out / "summary.json", summary)
    return {**summary, "finalized": True}


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _read_parts(out: Path) -> list[dict]:
    """The rows of every per-process part a run is writing (or a killed run left), oldest part first."""
    found = []  # (mtime, text) of each part still there: another task of the folder may merge and drop them meanwhile
    try:
        for part in (out / ".manifest_parts").glob("*.jsonl"):
            try:
                found.append((part.stat().st_mtime, part.read_text(encoding="utf-8")))
            except FileNotFoundError:  # merged into manifest.csv and dropped since the listing
                continue
    except FileNotFoundError:  # no parts, or the folder of parts dropped while being listed
        pass
    rows = []
    for _, text in sorted(found, key=lambda f: f[0]):
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by an interrupt
                continue
    return rows


def _read_manifest_rows(out: Path) -> list[dict]:
    """Rows of an existing manifest.csv, then of per-process parts (later records win on merge)."""
    return _read_csv(out / "manifest.csv") + _read_parts(out)


def _key(row: dict) -> tuple[int, str]:
    return int(row["index"]), row["method"]


def merge_manifest(out: Path) -> tuple[list[dict], list[dict]]:
    """Write manifest.csv from the old manifest and every part, keeping rows whose image exists, and timings.csv
    with the same images' timings (from timings.csv, the parts, or the seconds columns of a manifest written before
    timings had their own file); drop the parts. Returns (manifest rows, timing rows), sorted alike."""
    merged: dict[tuple[int, str], dict] = {}
    for row in _read_manifest_rows(out):
        if (out / row["file"]).is_file():
            merged[_key(row)] = {k: row.get(k, "") for k in MANIFEST_FIELDS}
    times: dict[tuple[int, str], dict] = {}
    for row in [*_read_csv(out / "manifest.csv"), *_read_csv(out / TIMINGS_FILE), *_read_parts(out)]:
        if row.get("seconds") not in (None, ""):
            times[_key(row)] = {"index": row["index"], "method": row["method"],
                                **{k: row.get(k, "") for k in TIMING_FIELDS}}
    keys = sorted(merged, key=lambda k: (k[0], order_key(k[1])))
    rows = [merged[k] for k in keys]
    timings = [times.get(k, {"index": k[0], "method": k[1], **dict.fromkeys(TIMING_FIELDS, "")}) for k in keys]
    for path, fields, records in ((out / "manifest.csv", MANIFEST_FIELDS, rows),
                                  (out / TIMINGS_FILE, ("index", "method", *TIMING_FIELDS), timings)):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        atomic_write_text(path, buf.getvalue())
    parts = out / ".manifest_parts"
    if parts.is_dir():
        for part in parts.glob("*.jsonl"):
            part.unlink(missing_ok=True)
        try:
            parts.rmdir()
        except OSError:
            pass
    return rows, timings


def image_seconds(out: Path, method: str) -> list[float]:
    """The recorded seconds (noise + sampling) of each image of `method` in a batch-runner folder: timings.csv, or
    the seconds column of a manifest.csv written before timings had their own file."""
    rows = _read_csv(out / TIMINGS_FILE) or _read_csv(out / "manifest.csv")
    return [float(r["seconds"]) for r in rows if r.get("method") == method and r.get("seconds") not in (None, "")]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(rows: Sequence[dict], num_prompts: int, batch_size: int, num_gen_steps: int | None) -> dict:
    """summary.json: the images of every method the folder holds (also those a rerun with fewer --methods did not
    make), and what they were made with. Nothing in it depends on the run (timings are in run.json)."""
    methods = sorted({r["method"] for r in rows}, key=order_key)
    return {"num_prompts": num_prompts, "batch_size": batch_size, "num_gen_steps": num_gen_steps,
            "methods": {m: {"images": sum(1 for r in rows if r["method"] == m)} for m in methods}}


def run_record(timings: Sequence[dict], stats: Sequence[dict], methods: Sequence[str], settings: dict) -> dict:
    """run.json: what differs from run to run: where and how it ran, what it made and skipped, and the mean
    per-image noise (RNN rollout / oracle) and sampling times of each method's images (as each was made)."""
    per_method = {}
    for method in methods:
        mine = [r for r in timings if r["method"] == method and r["sampling_seconds"] != ""]
        mean_noise = _mean([float(r["noise_seconds"]) for r in mine])
        mean_sampling = _mean([float(r["sampling_seconds"]) for r in mine])
        per_method[method] = {
            "generated_this_run": sum(s["generated"].get(method, 0) for s in stats),
            "skipped_existing": sum(s["skipped"].get(method, 0) for s in stats),
            "mean_noise_seconds_per_image": mean_noise,
            "mean_sampling_seconds_per_image": mean_sampling,
            "noise_over_sampling": (mean_noise / mean_sampling) if mean_noise is not None and mean_sampling else None,
        }
    return {**{k: settings.get(k) for k in RUN_KEYS}, "methods": per_method}


def log_summary(summary: dict, out: Path) -> None:
    """One log line per method (images, new, already there, mean noise and sampling times), then the files; for a
    task whose folder still misses other tasks' images, its own part and what is missing; after --finalize, the
    files it wrote."""
    if summary.get("finalized"):
        logger.info("done: manifest %s and summary %s of %s", out / "manifest.csv", out / "summary.json",
                    ", ".join(f"{s['images']} {m} images" for m, s in summary["methods"].items()))
        return
    if summary.get("missing") is not None:
        task = f"task {summary['shard_index']} of {summary['num_shards']}"
        for method, s in summary["methods"].items():
            logger.info("%s: %s: %d new, %d already there", task, method, s["generated_this_run"],
                        s["skipped_existing"])
        logger.info("%s done; %s: the run that completes them writes manifest.csv and summary.json (or run the "
                    "same command with --finalize once all tasks are done)", task,
                    describe_missing(summary["missing"], summary["num_prompts"] * len(summary["methods"])))
        return
    for method, s in summary["methods"].items():
        noise, sampling = s["mean_noise_seconds_per_image"], s["mean_sampling_seconds_per_image"]
        timing = "" if sampling is None else f"; mean per image: noise {noise:.4f}s, sampling {sampling:.4f}s"
        if s["noise_over_sampling"] is not None and method != "standard":
            timing += f" (noise = {100 * s['noise_over_sampling']:.1f}% of sampling)"
        logger.info("%s: %d images (%d new, %d already there)%s", method, s["images"], s["generated_this_run"],
                    s["skipped_existing"], timing)
    logger.info("manifest %s, summary %s, timings %s and %s (%d process(es))", out / "manifest.csv",
                out / "summary.json", out / TIMINGS_FILE, out / RUN_FILE, summary["num_processes"])
