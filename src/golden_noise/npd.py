"""Stage 2: the golden-noise sequence dataset (x_T, x'_1 ... x'_n per prompt), batched, sharded and resumable.

The files are golden_noise.layout's. A sample is complete when all its files are intact (layout.tensor_file_intact:
a fast zip-structure check); each file appears atomically, so a killed run leaves only complete files, and a rerun
of the same command finishes the job, regenerating any missing, truncated or unreadable file. A rerun with other
prompts or with any setting that changes the bytes is refused, naming the differences, before any file changes;
a longer prompt list that starts with the old one (a larger --max_prompts) adds its samples exactly.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Collection, Sequence

import torch

from . import layout
from .diffusion import (count_long_prompts, encode_prompts, family_of, guidance_branches, image_size, latent_shape,
                        load_pipeline, optimize_unet, resolve_text_embedding, text_embedding)
from .golden import GoldenConfig, GoldenStep, golden_step
from .io import BackgroundWriter, remove_stale_temps
from .prompts import Prompt, prompt_fingerprint, read_prompts
from .runs import check_writable_dir, read_settings, refuse_mixed_rerun
from .scoring import ScoringConfig
from .runtime import get_logger, global_batches, model_dtype, resolve_device, resolve_dtype, shard

logger = get_logger(__name__)

FORMAT_VERSION = layout.FORMAT_VERSION
PROMPT_KEYS = ("num_prompts", "prompt_fingerprint")
# run_config keys that must agree for a rerun to add to an existing dataset: everything that changes the bytes.
# batch_size: a sample's golden sequence differs in the last float bits with its batch's composition.
SIGNATURE_KEYS = ("format_version", "base_model_id", "revision", "variant", "pipeline_class", "scheduler_config",
                  "golden", "num_steps", "height", "width", "latent_shape", "dtype", "storage_dtype",
                  "text_embedding", "save_prompt_embeds", "start_seed", "batch_size", "device_type", "scoring",
                  *PROMPT_KEYS)
# the subset known before the model loads: checked first, so a refused rerun costs no model load
EARLY_KEYS = ("format_version", "base_model_id", "revision", "variant", "golden", "num_steps", "dtype",
              "storage_dtype", "save_prompt_embeds", "start_seed", "batch_size", "device_type", "scoring",
              *PROMPT_KEYS)
GUIDANCE_RULE = ("eps = eps_u + w (eps_c - eps_u) for any w >= 0, exactly as given: w = 1 evaluates the conditional "
                 "branch alone, w = 0 the unconditional branch alone, any other w both (0 < w < 1 interpolates, "
                 "w > 1 extrapolates); diffusers' sampling rule 'w <= 1 means no guidance' does not apply here")


@dataclass
class GenerationSettings:
    """What shapes a sequence dataset (besides the prompts and the batch size)."""

    base_model_id: str
    num_steps: int = 10
    golden: GoldenConfig = field(default_factory=GoldenConfig)
    height: int | None = None
    width: int | None = None
    start_seed: int = 0
    dtype: str = "float32"
    storage_dtype: str = "float16"
    save_prompt_embeds: bool = False
    scoring: ScoringConfig | None = None  # score each sample (golden_noise.scoring); None: no scores
    text_embedding: str = "auto"  # see diffusion.TEXT_EMBEDDINGS
    revision: str | None = None
    variant: str | None = None


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def effective_guidance(config: GoldenConfig) -> dict:
    """run_config's record of what the golden step's two guidance scales do (GUIDANCE_RULE)."""
    steps = {"denoise": config.denoise_guidance_scale, "inversion": config.inversion_guidance_scale}
    formula = {1.0: "eps_c", 0.0: "eps_u"}
    return {"rule": GUIDANCE_RULE,
            **{name: {"scale": w, "eps": formula.get(w, f"eps_u + {w:g} (eps_c - eps_u)"),
                      "branches": guidance_branches(w)} for name, w in steps.items()}}


def log_guidance(config: GoldenConfig) -> None:
    """Say in the log what a guidance scale <= 1 means in the golden step (its effective_guidance record)."""
    record = effective_guidance(config)
    for step, flag in (("denoise", "--denoise_guidance_scale"), ("inversion", "--inversion_guidance_scale")):
        w, eps, branches = record[step]["scale"], record[step]["eps"], record[step]["branches"]
        if w <= 1:
            logger.info("%s %g: the golden step uses eps = %s (UNet branches: %s); unlike diffusers' sampling, where "
                        "w <= 1 means 'no guidance', it applies eps_u + w (eps_c - eps_u) for any w >= 0", flag, w,
                        eps, " + ".join(branches))


def inputs_config(prompts: Sequence[Prompt], batch_size: int, device_type: str) -> dict:
    """The run_config keys that come from the prompt list and the run, not from the model or the settings."""
    return {"batch_size": batch_size, "device_type": device_type, "num_prompts": len(prompts),
            "prompt_fingerprint": prompt_fingerprint(prompts)}


def early_config(settings: GenerationSettings, prompts: Sequence[Prompt], batch_size: int, device_type: str) -> dict:
    """run_config's EARLY_KEYS, known before the model loads: the settings' own values, recorded as given."""
    as_given = {k: getattr(settings, k) for k in EARLY_KEYS
                if hasattr(settings, k) and k not in ("golden", "scoring")}
    return {"format_version": FORMAT_VERSION, **as_given, "golden": settings.golden.to_dict(),
            "scoring": settings.scoring.record() if settings.scoring else None,
            **inputs_config(prompts, batch_size, device_type)}


def execution_device(pipe) -> torch.device:
    """Where the denoiser runs (with model CPU offload its parameters wait on the CPU)."""
    return family_of(pipe).device


def build_run_config(pipe, settings: GenerationSettings, golden: GoldenStep, prompt_file: str | None = None,
                     prompt_column: str | None = None, prompts: Sequence[Prompt] | None = None,
                     batch_size: int | None = None) -> dict:
    """The dataset's run_config.json: every parameter that shaped the data."""
    height, width = image_size(pipe, settings.height, settings.width)
    family = family_of(pipe)
    inputs = inputs_config(prompts, batch_size, execution_device(pipe).type) if prompts is not None else {}
    return {
        "format_version": FORMAT_VERSION,
        "base_model_id": settings.base_model_id,
        "revision": settings.revision,
        "variant": settings.variant,
        "pipeline_class": type(pipe).__name__,
        "family": family.record(),
        "latent_space": family.latent_space(),
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "golden": {**settings.golden.to_dict(), **golden.record()},
        "num_steps": settings.num_steps,
        "height": height,
        "width": width,
        "latent_shape": list(latent_shape(pipe, height, width)),
        "dtype": settings.dtype,
        "storage_dtype": settings.storage_dtype,
        "text_embedding": resolve_text_embedding(pipe, settings.text_embedding),
        "save_prompt_embeds": settings.save_prompt_embeds,
        "start_seed": settings.start_seed,
        "prompt_file": prompt_file,
        "prompt_column": prompt_column,
        **inputs,
        "effective_guidance": effective_guidance(settings.golden),
        **({"scoring": settings.scoring.record()} if settings.scoring else {}),  # unscored: the key is absent
        "versions": package_versions(),
    }


@dataclass
class RerunPlan:
    """What a rerun into an existing dataset may do: add samples, and with a longer prompt list whose start is the
    old list (`extends`), recompute the old list's last partial batch (`stale`) in its new, full batch."""

    exists: bool = False
    extends: bool = False
    stale: list[Prompt] = field(default_factory=list)
    old_prompts: list[Prompt] = field(default_factory=list)


def check_rerun(root: str | Path, new: dict, prompts: Sequence[Prompt], batch_size: int,
                keys: Sequence[str] = SIGNATURE_KEYS) -> RerunPlan:
    """Refuse to add to a dataset made with other prompts or settings (naming every difference); else the plan."""
    path = Path(root) / layout.RUN_CONFIG
    old = read_settings(path, "--output_dir")
    if old is None:
        return RerunPlan()
    if isinstance(new.get("golden"), dict) and isinstance(old.get("golden"), dict):
        # before the model loads, the schedule's t0, t_prev and coefficient are unknown: compare the flags' fields
        new = {**new, "golden": {**old["golden"], **new["golden"]}}
    n_old = old.get("num_prompts")
    extends = (isinstance(n_old, int) and 0 < n_old < len(prompts)
               and prompt_fingerprint(prompts[:n_old]) == old.get("prompt_fingerprint"))
    refuse_mixed_rerun(path, new, [k for k in keys if not (extends and k in PROMPT_KEYS)], "--output_dir",
                       what="a dataset")
    if not extends:
        return RerunPlan(exists=True)
    stale = list(prompts[n_old - n_old % batch_size:n_old])
    return RerunPlan(exists=True, extends=True, stale=stale, old_prompts=list(prompts[:n_old]))


def write_metadata(root: Path, prompts: Sequence[Prompt], settings: GenerationSettings,
                   skip: Collection[int] = (), known_complete: Collection[int] = ()) -> int:
    """Write metadata.csv (sorted by id) for every complete sample not in `skip`; return the number of rows.
    Samples in `known_complete` (checked or written by this process) are not checked again."""
    scored = settings.scoring is not None
    rows = [{"id": p.index, "prompt": p.text, "seed": settings.start_seed + p.index, "num_steps": settings.num_steps}
            for p in prompts if p.index not in skip and (p.index in known_complete or not layout.damaged_columns(
                root, p.index, settings.save_prompt_embeds, scored))]
    if scored:
        rows = [{**r, **layout.score_fields(root, r["id"])} for r in rows]
    return layout.write_metadata(root, rows, settings.save_prompt_embeds, scored)


def extend_dataset(root: Path, plan: RerunPlan, run_config: dict, settings: GenerationSettings) -> None:
    """Make an existing dataset the start of a longer prompt list: its last partial batch's samples leave
    metadata.csv, then their files go (they are recomputed in their new batch), then run_config records the new
    list. Each step is atomic and a kill between steps leaves a dataset that the same rerun finishes."""
    stale = {p.index for p in plan.stale}
    if stale:
        write_metadata(root, plan.old_prompts, settings, skip=stale)
        for sample_id in sorted(stale):
            scored = settings.scoring is not None
            for rel in layout.sample_files(sample_id, settings.save_prompt_embeds, scored).values():
                (root / rel).unlink(missing_ok=True)
    layout.write_run_config(root, run_config)
    logger.info("the prompt list extends the dataset's %d prompts to %d; %d samples of the old last batch are "
                "recomputed in their new batch", len(plan.old_prompts), run_config["num_prompts"], len(stale))


class SequenceDatasetWriter:
    """Writes samples (layout.write_sample) on a background thread so file I/O overlaps the next batch's UNet work."""

    def __init__(self, root: Path, storage_dtype: torch.dtype, save_prompt_embeds: bool, scored: bool = False):
        self.root, self.storage_dtype, self.save_prompt_embeds = root, storage_dtype, save_prompt_embeds
        self.scored = scored
        self.writer = BackgroundWriter(max_pending=4, drain_to=2)

    def submit(self, sample_id: int, source, sequence, text, prompt_embeds=None,
               only: Collection[str] | None = None, scores=None) -> None:
        """Queue one sample's tensors (`scores`: (2,) float64, kept in float64); `only` names the layout columns
        to write (default: all)."""
        tensors = {"source_noise_file": source, "golden_sequence_file": sequence, "text_embedding_file": text}
        if self.save_prompt_embeds:
            tensors["prompt_embeds_file"] = prompt_embeds
        # .clone(): a saved view would carry its whole batch's storage
        tensors = {k: v.detach().to("cpu", self.storage_dtype).clone() for k, v in tensors.items()
                   if only is None or k in only}
        if self.scored and (only is None or layout.SCORES_COLUMN in only):
            tensors[layout.SCORES_COLUMN] = scores.detach().to("cpu", torch.float64).clone()
        self.writer.submit(layout.write_sample, self.root, sample_id, tensors, self.save_prompt_embeds, only,
                           self.scored)

    def close(self) -> None:
        self.writer.close()


@dataclass
class WorkPlan:
    """One process's share of the work: its global batches with the files each sample still needs."""

    batches: list[tuple[list[Prompt], dict[int, list[str]]]]  # (whole batch, {sample id: columns to write})
    ids: set[int] = field(default_factory=set)  # the samples of this process's share: complete once it ran
    to_write: int = 0       # samples with at least one file to write
    damaged: list[str] = field(default_factory=list)  # files present but truncated or unreadable


def plan_work(root: Path, prompts: Sequence[Prompt], batch_size: int, rank: int, world: int,
              save_prompt_embeds: bool, scored: bool = False) -> WorkPlan:
    """Scan this process's share of the fixed global batches for missing or damaged files (fast: no tensor load)."""
    plan = WorkPlan(batches=[])
    for batch in shard(global_batches(prompts, batch_size), rank, world):
        todo = {}
        for p in batch:
            bad = layout.damaged_columns(root, p.index, save_prompt_embeds, scored)
            if bad:
                todo[p.index] = bad
                files = layout.sample_files(p.index, save_prompt_embeds, scored)
                plan.damaged += [files[c] for c in bad if os.path.lexists(root / files[c])]
        plan.ids.update(p.index for p in batch)
        plan.to_write += len(todo)
        if todo:
            plan.batches.append((batch, todo))
    return plan


def prepare_output(root: Path, run_config: dict, prompts: Sequence[Prompt], batch_size: int,
                   settings: GenerationSettings, pipe, state) -> None:
    """Check a rerun (every process, before any write), then on the main process create the folder, record
    run_config, extend the dataset or clear temp files, and log what the run will do."""
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    plan = check_rerun(root, run_config, prompts, batch_size)  # every process checks, so all fail alike
    barrier()
    if state is None or state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if plan.extends:
            extend_dataset(root, plan, run_config, settings)
        elif not plan.exists:
            layout.write_run_config(root, run_config)
        stale = remove_stale_temps([root / layout.SEQUENCES])  # a killed run's temporary files (never read)
        if stale:
            logger.info("removed %d temporary files left by an interrupted run", stale)
        long = count_long_prompts(pipe, [p.text for p in prompts])
        if long:
            logger.warning("%d of %d prompts exceed the %d-token CLIP window and are truncated", long, len(prompts),
                           pipe.tokenizer.model_max_length)
        log_guidance(settings.golden)
    barrier()


@torch.no_grad()
def compute_batches(pipe, golden: GoldenStep, plan: WorkPlan, settings: GenerationSettings,
                    writer: SequenceDatasetWriter, bar, scorer=None) -> None:
    """Run the golden step on each planned batch (and the `scorer`, if any) and queue the files its samples still
    need."""
    family = family_of(pipe)
    shape = latent_shape(pipe, settings.height, settings.width)
    height, width = image_size(pipe, settings.height, settings.width)
    storage = resolve_dtype(settings.storage_dtype)
    need_uncond = any(guidance_branches(w) != ["cond"] for w in (settings.golden.denoise_guidance_scale,
                                                                 settings.golden.inversion_guidance_scale))
    device = execution_device(pipe)
    for batch, todo in plan.batches:
        # the whole fixed batch is recomputed so each sample sees the same batch composition
        texts = [p.text for p in batch]
        cond = encode_prompts(pipe, texts, height=height, width=width, with_uncond=need_uncond)
        x_t = family.initial_noise([settings.start_seed + p.index for p in batch], shape, device=device)
        seq = golden.sequence(x_t, cond, settings.num_steps)  # (B, n, C, H, W)
        # one device->host copy per batch and tensor, not a synchronising copy per sample
        x_host, seq_host = x_t.to("cpu", storage), seq.to("cpu", storage)  # (B, C, H, W), (B, n, C, H, W)
        text_host = text_embedding(pipe, texts, cond, settings.text_embedding).to("cpu", storage)  # (B, P)
        embeds_host = cond.cond_embeds.to("cpu", storage) if settings.save_prompt_embeds else None  # (B, 77, D)
        # (B, 2) float64; only where a sample still needs its scores file (a resumed or repaired batch may not)
        needs_scores = scorer is not None and any(layout.SCORES_COLUMN in columns for columns in todo.values())
        scores = scorer(texts, x_t, seq[:, -1]) if needs_scores else None
        for i, p in enumerate(batch):
            if p.index in todo:
                writer.submit(p.index, x_host[i], seq_host[i], text_host[i],
                              embeds_host[i] if embeds_host is not None else None, only=todo[p.index],
                              scores=scores[i] if scores is not None else None)
        bar.update(len(todo))


@torch.no_grad()
def generate_dataset(pipe, prompts: Sequence[Prompt], output_dir: str | Path, settings: GenerationSettings,
                     batch_size: int = 8, state=None, prompt_file: str | None = None,
                     prompt_column: str | None = None, progress: bool = True) -> dict:
    """Generate (or finish) a sequence dataset; returns counts and timings. `state` is an accelerate
    PartialState (or None for one process): process r takes global batches r, r + P, r + 2P, ..."""
    from tqdm.auto import tqdm

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    root = Path(output_dir)
    golden = golden_step(pipe, settings.golden, settings.height, settings.width)
    run_config = build_run_config(pipe, settings, golden, prompt_file, prompt_column, prompts, batch_size)
    prepare_output(root, run_config, prompts, batch_size, settings, pipe, state)
    scored = settings.scoring is not None
    plan = plan_work(root, prompts, batch_size, rank, world, settings.save_prompt_embeds, scored)
    if plan.damaged:
        logger.warning("%d sample files are truncated or unreadable and are regenerated: %s%s", len(plan.damaged),
                       ", ".join(plan.damaged[:3]), ", ..." if len(plan.damaged) > 3 else "")
    writer = SequenceDatasetWriter(root, resolve_dtype(settings.storage_dtype), settings.save_prompt_embeds, scored)
    scorer = None
    if scored and plan.batches:
        from .scoring import SampleScorer

        scorer = SampleScorer(pipe, settings.scoring, *image_size(pipe, settings.height, settings.width))
    start = time.perf_counter()
    bar = tqdm(total=plan.to_write, desc=f"golden sequences [{rank}/{world}]", unit="sample",
               disable=not (progress and rank == 0), dynamic_ncols=True)
    try:
        compute_batches(pipe, golden, plan, settings, writer, bar, scorer)
    finally:
        bar.close()
        writer.close()
    elapsed = time.perf_counter() - start
    if state is not None:
        state.wait_for_everyone()
    rows = write_metadata(root, prompts, settings, known_complete=plan.ids) if rank == 0 else None
    computed = sum(len(b) for b, _ in plan.batches) * settings.num_steps  # golden steps, whole batches
    evaluations = golden.counter.evaluations
    return {"generated": plan.to_write, "already_complete": len(plan.ids) - plan.to_write,
            "damaged_files": len(plan.damaged), "metadata_rows": rows, "seconds": elapsed,
            "unet_evaluations": evaluations, "denoiser": family_of(pipe).denoiser_name, "process_index": rank, "num_processes": world,
            "unet_evaluations_per_golden_step": evaluations / computed if computed else None}


@dataclass
class GenerationJob:
    """A stage-2 run as the CLI states it: the prompts, the dataset folder, the settings and how to run."""

    prompt_file: str
    output_dir: str
    settings: GenerationSettings  # settings.dtype may be "auto": float16 on CUDA, float32 elsewhere
    prompt_column: str | None = None
    max_prompts: int | None = None
    batch_size: int = 8
    device: str = "auto"
    enable_model_cpu_offload: bool = False
    enable_vae_slicing: bool = False  # stage 2 never decodes: accepted for the same flags as stages 4 and 5
    enable_vae_tiling: bool = False
    channels_last: bool = False
    compile: bool = False
    progress: bool = True


def run_generation(job: GenerationJob, state=None) -> dict:
    """Check the output folder, read the prompts, refuse a mixed rerun, then load the model and generate."""
    check_writable_dir(job.output_dir, "--output_dir")  # before any prompt is read or model loaded
    prompts = read_prompts(job.prompt_file, job.prompt_column)[: job.max_prompts]
    device = state.device if job.device == "auto" and state is not None else resolve_device(job.device)
    settings = replace(job.settings, dtype=model_dtype(job.settings.dtype, device))
    if settings.scoring is not None:
        settings.scoring.check()  # an unknown --score_metric fails before any model loads
    check_rerun(job.output_dir, early_config(settings, prompts, job.batch_size, torch.device(device).type), prompts,
                job.batch_size, EARLY_KEYS)
    pipe = load_pipeline(settings.base_model_id, settings.revision, settings.variant, settings.dtype, device,
                         cpu_offload=job.enable_model_cpu_offload, vae_slicing=job.enable_vae_slicing,
                         vae_tiling=job.enable_vae_tiling)
    optimize_unet(family_of(pipe).denoiser, channels_last=job.channels_last, compile_unet=job.compile)
    if state is None or state.is_main_process:
        g = settings.golden
        logger.info("Generating golden sequences: %d prompts, n=%d, N=%d, w_l=%g, w_w=%g, batch %d, %d process(es), "
                    "%s", len(prompts), settings.num_steps, g.schedule_steps, g.denoise_guidance_scale,
                    g.inversion_guidance_scale, job.batch_size, state.num_processes if state else 1, device)
    return generate_dataset(pipe, prompts, job.output_dir, settings, batch_size=job.batch_size, state=state,
                            prompt_file=str(job.prompt_file), prompt_column=job.prompt_column, progress=job.progress)
