"""Stage 2, the dataset generator: the golden-noise sequence dataset (x_T, x'_1 ... x'_n per prompt) in the sharded
format (golden_noise.dataset.format), batched, split across processes and machines, resumable.

Shard k holds the prompts at positions [k*S, (k+1)*S) of the prompt list, S a multiple of the batch size, so each
fixed global batch lies in one shard and the dataset is byte-identical for any process or machine count and any
resume point. A run makes its task's shards (`Task`: task i of K takes shards i, i + K, ...; one task by default,
SLURM array variables otherwise), its processes dealing the shards' batches round-robin; each batch goes to one
staging file, and a shard is sealed as soon as all its batches are there (dataset.writer). The run whose shard
completes the dataset writes index.json and the dataset card (`--finalize` does it alone).

A rerun of the same command finishes the job: sealed shards are checked (sha256), staging files are checked (every
byte) and only what is missing or damaged is regenerated. A rerun with other prompts or with any setting that
changes the bytes is refused, naming the differences, before any file changes; a longer prompt list that starts
with the old one (a larger --max_prompts) adds its samples exactly (the old partial last shard is rebuilt).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from ..cli import SEED_RULES, check_fields, check_seeds, rerun_keys, setting
from ..diffusion import (DEFAULT_MODEL_ID, TEXT_EMBEDDINGS, count_long_prompts, encode_prompts, family_of,
                         guidance_branches, image_size, latent_shape, load_pipeline, optimize_unet,
                         resolve_text_embedding, text_embedding)
from ..errors import UserError
from ..golden import GoldenConfig, GoldenStep, golden_step
from ..io import remove_stale_temps
from ..prompts import Prompt, prompt_fingerprint, read_prompts
from ..runs import (RunLock, Task, check_writable_dir, finalize_setting, num_shards_setting, read_settings,
                    refuse_mixed_rerun, shard_index_setting)
from ..runtime import (get_logger, global_batches, model_dtype, on_main, package_versions, resolve_device,
                       resolve_dtype)
from ..scoring import SampleScorer, ScoringConfig
from . import format as F
from .shards import sealed_records, verify_shards
from .writer import (SampleSpec, ShardSample, StagingWriter, finalize, read_batch, remove_index, seal_shard,
                     unseal_shard)

logger = get_logger(__name__)

GUIDANCE_RULE = ("eps = eps_u + w (eps_c - eps_u) for any w >= 0, exactly as given: w = 1 evaluates the conditional "
                 "branch alone, w = 0 the unconditional branch alone, any other w both (0 < w < 1 interpolates, "
                 "w > 1 extrapolates); diffusers' sampling rule 'w <= 1 means no guidance' does not apply here")


@dataclass
class GenerationSettings:
    """What shapes a sequence dataset (besides the prompts): every field is part of run_config.json. Each field's
    metadata (golden_noise.cli.setting) says its flag (help, --help group, range) and how run_config records it:
    `rerun` (as given: a rerun with another value is refused before the model loads) or `loaded` (resolved against
    the model: refused once it is loaded). Fields without a group get their flags elsewhere: the shared pipeline
    flags (cli.add_pipeline_arguments), or a nested config's own."""

    base_model_id: str = setting(DEFAULT_MODEL_ID, rerun=True)
    revision: str | None = setting(None, rerun=True)
    variant: str | None = setting(None, rerun=True)
    dtype: str = setting("float32", rerun=True)  # resolved from --dtype auto before anything is compared
    start_seed: int = setting(0, "sample seed = start_seed + prompt index", group="data", rerun=True, **SEED_RULES)
    storage_dtype: str = setting("float16", "dtype of the stored noise tensors", group="data", rerun=True,
                                 choices=("float16", "float32"))
    save_prompt_embeds: bool = setting(False, "also store the full prompt token embeddings (77 x D) per sample",
                                       group="data", rerun=True)
    text_embedding: str = setting(
        "auto", "the prompt representation stored for the RNN: pooled (SDXL: text_encoder_2's projection; SD3: "
        "pooled_projections; FLUX: CLIP's pooled output), mean_token (the token embeddings averaged over the prompt's "
        "own tokens; SD3: its CLIP tokens, FLUX: T5) or both; auto = pooled where the model family has one, else "
        "mean_token (SD 1.5/2.1)", group="data", loaded=True, choices=TEXT_EMBEDDINGS)
    height: int | None = setting(None, "image height in pixels (default: the model's)", group="model", loaded=True)
    width: int | None = setting(None, "image width in pixels (default: the model's)", group="model", loaded=True)
    num_steps: int = setting(10, "n: golden steps per sequence", group="golden step", rerun=True, min=1)
    golden: GoldenConfig = setting(default_factory=GoldenConfig)  # recorded as one dict, `golden` (RECORDS)
    batch_size: int = setting(8, "prompts per UNet call (2x that with CFG); part of the dataset's settings: a "
                                 "sample's sequence depends on its batch in the last float bits, so a rerun must keep "
                                 "it", group="golden step", rerun=True, min=1)
    scoring: ScoringConfig | None = setting(None, rerun=True)  # its own flags; None: no scores
    samples_per_shard: int | None = setting(
        None, "samples per shard file (a multiple of --batch_size; default: about 1 GiB of samples, rounded down to a "
        "multiple of --batch_size); part of the dataset's settings", group="shards and machines", min=1,
        loaded="sharding")


@dataclass
class GenerationJob:
    """A stage-2 run as the CLI states it: the prompts, the dataset folder, the settings and how to run."""

    prompt_file: str | None = setting(None, "prompts: .txt (one per line) or .csv/.tsv (see --prompt_column); "
                                            "required unless --finalize", group="data")
    prompt_column: str | None = setting(None, "column of a .csv/.tsv prompt file (default: prompt or caption)",
                                        group="data")
    output_dir: str = setting("./data/npd_sequence_dataset_sdxl/", "dataset directory to write", group="data")
    max_prompts: int | None = setting(None, "use only the first N prompts of the file (a rerun with a larger N adds "
                                            "samples)", group="data", min=1)
    settings: GenerationSettings = setting(default_factory=GenerationSettings)  # dtype may be "auto" (CUDA: fp16)
    device: str = "auto"  # the pipeline flags
    enable_model_cpu_offload: bool = False
    enable_vae_slicing: bool = False  # stage 2 never decodes: accepted for the same flags as stages 4 and 5
    enable_vae_tiling: bool = False
    channels_last: bool = setting(False, "run the denoiser in channels_last memory format (faster UNet convolutions "
                                         "on recent GPUs)", group="model")
    compile: bool = setting(False, "torch.compile the denoiser (UNet or transformer): minutes of compilation up "
                                   "front, then faster steps on large runs", group="model")
    num_shards: int | None = num_shards_setting("the dataset's shards", "shards i, i + K, i + 2K, ...")
    shard_index: int | None = shard_index_setting()
    finalize: bool = finalize_setting("only write index.json (and the dataset card) of a dataset whose shards are all "
                                      "sealed (the run that seals the last one does this itself); name the missing "
                                      "shards otherwise")
    progress: bool = True


PROMPT_KEYS = ("num_prompts", "prompt_fingerprint")
MODEL_KEYS = ("pipeline_class", "scheduler_config", "latent_shape")  # recorded from the loaded model
RECORDS = ("golden",)  # nested configs recorded as one dict under their field's name
# run_config keys that must agree for a rerun to add to an existing dataset: everything that changes the bytes
# (batch_size included: a sample's golden sequence differs in the last float bits with its batch's composition; and
# the device type). Known before the model loads: checked first, so a refused rerun costs no model load.
EARLY_KEYS = ("format_version", *rerun_keys(GenerationSettings, "rerun", exclude=RECORDS), *RECORDS, "device_type",
              *PROMPT_KEYS)
SIGNATURE_KEYS = (*EARLY_KEYS, *rerun_keys(GenerationSettings, "loaded", exclude=RECORDS), *MODEL_KEYS)


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


def early_config(settings: GenerationSettings, prompts: Sequence[Prompt], device_type: str) -> dict:
    """run_config's EARLY_KEYS known before the model loads, recorded as given (a default samples_per_shard is
    resolved only then: left out)."""
    as_given = {k: getattr(settings, k) for k in EARLY_KEYS if hasattr(settings, k) and k not in (*RECORDS, "scoring")}
    out = {"format_version": F.FORMAT_VERSION, **as_given, "golden": settings.golden.to_dict(),
           "scoring": settings.scoring.record() if settings.scoring else None,
           **inputs_config(prompts, settings.batch_size, device_type)}
    if settings.samples_per_shard is not None:
        out["sharding"] = {"samples_per_shard": settings.samples_per_shard}
    return out


def build_run_config(pipe, settings: GenerationSettings, golden: GoldenStep, prompt_file: str | None = None,
                     prompt_column: str | None = None, prompts: Sequence[Prompt] | None = None) -> dict:
    """The dataset's run_config.json: every parameter that shaped the data."""
    height, width = image_size(pipe, settings.height, settings.width)
    family = family_of(pipe)
    inputs = inputs_config(prompts, settings.batch_size, family.device.type) if prompts is not None else {}
    config = {
        "format_version": F.FORMAT_VERSION,
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
        "versions": package_versions("pyarrow", "datasets"),
    }
    if prompts is None:
        return config
    if settings.samples_per_shard is not None and settings.samples_per_shard % settings.batch_size:
        raise UserError(f"--samples_per_shard {settings.samples_per_shard} must be a multiple of --batch_size "
                        f"{settings.batch_size} (a batch never straddles two shards)")
    return F.with_sharding(config, settings.samples_per_shard)


@dataclass
class RerunPlan:
    """What a rerun into an existing dataset may do: add samples, and with a longer prompt list whose start is the
    old list (`extends`), recompute the old list's last partial batch (`stale`) in its new, full batch."""

    exists: bool = False
    extends: bool = False
    stale: list[Prompt] = field(default_factory=list)
    old_prompts: list[Prompt] = field(default_factory=list)
    old: dict | None = None


def check_rerun(root: str | Path, new: dict, prompts: Sequence[Prompt], keys: Sequence[str] = SIGNATURE_KEYS,
                early: bool = False) -> RerunPlan:
    """Refuse to add to a dataset made with other prompts or settings (naming every difference); else the plan.
    `early`: `new` holds only what is known before the model loads (nested records partly: compared field by
    field)."""
    path = Path(root) / F.RUN_CONFIG
    old = read_settings(path, "--output_dir")
    if old is None:
        return RerunPlan()
    if old.get("format_version", F.LOOSE_FORMAT_VERSION) == F.LOOSE_FORMAT_VERSION:
        raise UserError(f"{path.parent} holds a format-1 dataset (loose files per sample): convert it with "
                        f"python scripts/convert_dataset.py {path.parent} NEW and rerun into NEW, or choose another "
                        "--output_dir")
    if early:
        keys = [k for k in keys if k in new]
        new = {**new, **{k: {**old[k], **v} for k, v in new.items() if isinstance(v, dict) and
                         isinstance(old.get(k), dict)}}
    n_old = old.get("num_prompts")
    extends = (isinstance(n_old, int) and 0 < n_old < len(prompts)
               and prompt_fingerprint(prompts[:n_old]) == old.get("prompt_fingerprint"))
    refuse_mixed_rerun(path, new, [k for k in keys if not (extends and k in PROMPT_KEYS)], "--output_dir",
                       what="a dataset")
    if not extends:
        return RerunPlan(exists=True, old=old)
    batch = int(old["batch_size"])
    stale = list(prompts[n_old - n_old % batch:n_old])
    return RerunPlan(exists=True, extends=True, stale=stale, old_prompts=list(prompts[:n_old]), old=old)


def extend_dataset(root: Path, plan: RerunPlan, run_config: dict, lock: RunLock | None) -> None:
    """Make an existing dataset the start of a longer prompt list: the index goes, the old partial last shard goes
    back into staging files (dataset.writer.unseal_shard) without the old last partial batch (its samples are
    recomputed in their new batch), then run_config records the new list. Each step is idempotent and a kill
    between steps leaves a dataset that the same rerun finishes."""
    per_shard, batch = int(run_config["sharding"]["samples_per_shard"]), int(run_config["batch_size"])
    n_old = len(plan.old_prompts)
    remove_index(root)
    if n_old % per_shard:
        last = (n_old - 1) // per_shard
        if lock is not None:
            lock.add([last])  # it may be another task's shard
        unseal_shard(root, last, range(last * per_shard, n_old - n_old % batch), batch, run_config)
    if n_old % batch:
        F.batch_path(root, n_old // batch).unlink(missing_ok=True)  # the old partial batch (an unfinished run's)
    F.write_run_config(root, run_config)
    logger.info("the prompt list extends the dataset's %d prompts to %d; %d samples of the old last batch are "
                "recomputed in their new batch", n_old, run_config["num_prompts"], len(plan.stale))


@dataclass
class WorkPlan:
    """One process's share of the work: the global batches (index, prompts) whose staging file it writes."""

    batches: list[tuple[int, list[Prompt]]]
    ids: set[int] = field(default_factory=set)  # the samples of this process's share: complete once it ran
    to_write: int = 0       # samples of the batches to compute
    damaged: list[str] = field(default_factory=list)  # staging files present but damaged (removed before the work)


def plan_work(root: Path, prompts: Sequence[Prompt], batch_size: int, shards: Sequence[int], per_shard: int,
              spec: SampleSpec, rank: int, world: int) -> WorkPlan:
    """Check the staging files of this process's round-robin share of the global batches of `shards` (every byte:
    writer.read_batch); damaged ones are removed (a shard is sealed once all its batches' files exist)."""
    plan = WorkPlan(batches=[])
    wanted = set(shards)
    batches = [(b, batch) for b, batch in enumerate(global_batches(prompts, batch_size))
               if b * batch_size // per_shard in wanted]
    for b, batch in batches[rank::world]:
        path = F.batch_path(root, b)
        _, why = read_batch(path, [p.index for p in batch], spec)
        if why:
            if why != "missing":
                plan.damaged.append(f"{F.STAGING}/{path.name} ({why})")
                path.unlink(missing_ok=True)
            plan.batches.append((b, batch))
            plan.to_write += len(batch)
        plan.ids.update(p.index for p in batch)
    return plan


class Sealer:
    """Seals this process's share of the shards (`mine`) as soon as the staging files of all a shard's batches
    exist (a cheap check after each batch, remembering what it found), and the rest at the end."""

    def __init__(self, root: Path, prompts: Sequence[Prompt], run_config: dict, mine: Sequence[int]):
        self.root, self.prompts, self.run_config = root, prompts, run_config
        self.spec, self.per_shard = SampleSpec.of(run_config), int(run_config["sharding"]["samples_per_shard"])
        self.batch = int(run_config["batch_size"])
        self.pending = {k: list(self.batches(k)) for k in mine}
        self.sealed: list[int] = []

    def batches(self, k: int) -> range:
        """The global batches of shard k."""
        first = k * self.per_shard // self.batch
        return range(first, first + -(-len(self.prompts[k * self.per_shard:(k + 1) * self.per_shard]) // self.batch))

    def samples(self, k: int) -> list[ShardSample]:
        start = self.run_config["start_seed"]
        return [ShardSample(p.index, p.text, start + p.index)
                for p in self.prompts[k * self.per_shard:(k + 1) * self.per_shard]]

    def poll(self) -> None:
        """Seal the first pending shard if it is complete."""
        if not self.pending:
            return
        k = min(self.pending)
        waiting = self.pending[k]
        while waiting and F.batch_path(self.root, waiting[-1]).exists():
            waiting.pop()
        if not waiting:
            self.seal(k)

    def chunks(self, k: int):
        """Shard k's staging batches, each checked (writer.read_batch)."""
        for b in self.batches(k):
            ids = [p.index for p in self.prompts[b * self.batch:(b + 1) * self.batch]]
            path = F.batch_path(self.root, b)
            arrays, why = read_batch(path, ids, self.spec)
            if why:
                raise UserError(f"{path} {why}: rerun generate_npd_series.py with the same flags to regenerate it")
            yield ids, arrays

    def seal(self, k: int) -> None:
        record = seal_shard(self.root, k, self.samples(k), self.run_config, self.chunks(k))
        for b in self.batches(k):
            F.batch_path(self.root, b).unlink(missing_ok=True)
        del self.pending[k]
        self.sealed.append(k)
        logger.info("sealed %s: %d samples, ids %d-%d, %.3g MB", record["file"], record["rows"], record["first_id"],
                    record["last_id"], record["bytes"] / 1e6)

    def finish(self) -> None:
        """Seal every pending shard (all its batches are written)."""
        for k in sorted(self.pending):
            self.seal(k)


def prepare_output(root: Path, run_config: dict, prompts: Sequence[Prompt], settings: GenerationSettings, pipe,
                   state, task: Task, lock: RunLock | None) -> None:
    """Check a rerun (every process, before any write), then on the main process create the folder, record
    run_config, extend the dataset or clear temporary files, and log what the run will do."""
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    plan = check_rerun(root, run_config, prompts)  # every process checks, so all fail alike
    barrier()
    if state is None or state.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if plan.extends:
            extend_dataset(root, plan, run_config, lock)
        elif not plan.exists:
            F.write_run_config(root, run_config)
        per_shard = run_config["sharding"]["samples_per_shard"]
        mine = set(task.shards(F.num_shards(len(prompts), per_shard)))
        batch = settings.batch_size
        owned = lambda name: name.startswith("batch-") and int(name[6:14]) * batch // per_shard in mine  # noqa
        stale = remove_stale_temps([root / F.STAGING], owned)  # a killed run's temporary files (never read)
        stale += remove_stale_temps([root / F.DATA], lambda name: any(name == F.shard_name(k) for k in mine))
        if stale:
            logger.info("removed %d temporary files left by an interrupted run", stale)
        long = count_long_prompts(pipe, [p.text for p in prompts])
        if long:
            logger.warning("%d of %d prompts exceed the %d-token CLIP window and are truncated", long, len(prompts),
                           pipe.tokenizer.model_max_length)
        log_guidance(settings.golden)
    barrier()


def check_sealed(root: Path, shards: Sequence[int], rank: int, world: int) -> list[int]:
    """Verify this process's share of the sealed `shards` (sha256); a damaged one is removed (it is made again).
    Returns the removed."""
    records = sealed_records(root, shards[rank::world])
    removed = []
    for record, why in verify_shards(root, records.values()):
        logger.warning("%s %s: it is made again", root / record["file"], why)
        (root / record["file"]).unlink(missing_ok=True)
        F.seal_record_path(root, record["shard"]).unlink(missing_ok=True)
        removed.append(record["shard"])
    return removed


@torch.no_grad()
def compute_batches(pipe, golden: GoldenStep, plan: WorkPlan, settings: GenerationSettings, writer: StagingWriter,
                    bar, scorer=None, after_batch=lambda: None) -> None:
    """Run the golden step on each planned batch (and the `scorer`, if any) and queue its staging file; a batch
    holding a non-finite value is an error (nothing of it is written)."""
    family = family_of(pipe)
    shape = latent_shape(pipe, settings.height, settings.width)
    height, width = image_size(pipe, settings.height, settings.width)
    storage = resolve_dtype(settings.storage_dtype)
    need_uncond = any(guidance_branches(w) != ["cond"] for w in (settings.golden.denoise_guidance_scale,
                                                                 settings.golden.inversion_guidance_scale))
    device = family.device
    for b, batch in plan.batches:
        texts = [p.text for p in batch]
        cond = encode_prompts(pipe, texts, height=height, width=width, with_uncond=need_uncond)
        x_t = family.initial_noise([settings.start_seed + p.index for p in batch], shape, device=device)
        seq = golden.sequence(x_t, cond, settings.num_steps)  # (B, n, C, H, W)
        # one device->host copy per batch and tensor, not a synchronising copy per sample
        host = {"source": x_t.to("cpu", storage), "golden": seq.to("cpu", storage),  # (B, C, H, W), (B, n, C, H, W)
                "text": text_embedding(pipe, texts, cond, settings.text_embedding).to("cpu", storage)}  # (B, P)
        if settings.save_prompt_embeds:
            host["prompt_embeds"] = cond.cond_embeds.to("cpu", storage)  # (B, 77, D)
        check_finite(batch, host, settings)
        if scorer is not None:
            host["scores"] = scorer(texts, x_t, seq[:, -1])  # (B, 2) float64
        writer.submit(b, [p.index for p in batch], host)
        bar.update(len(batch))
        after_batch()


def check_finite(batch: Sequence[Prompt], host: dict, settings: GenerationSettings) -> None:
    """Refuse to write a batch whose stored tensors hold NaN or inf (in the storage dtype: a float16 overflow too)."""
    for column, t in host.items():
        bad = (~torch.isfinite(t)).flatten(1).any(dim=1)  # (B,)
        if bad.any():
            first = batch[int(bad.nonzero()[0])]
            g = settings.golden
            raise UserError(f"sample {first.index} ({int(bad.sum())} of its batch of {len(batch)}): its "
                            f"{'golden sequence' if column == 'golden' else column.replace('_', ' ')} holds NaN or "
                            f"inf values in "
                            f"{settings.storage_dtype}, nothing of the batch was written: use finite, moderate "
                            f"guidance scales (--denoise_guidance_scale {g.denoise_guidance_scale:g}, "
                            f"--inversion_guidance_scale {g.inversion_guidance_scale:g}) or --storage_dtype float32 "
                            "for values beyond float16's range")


@torch.no_grad()
def generate_dataset(pipe, prompts: Sequence[Prompt], output_dir: str | Path, settings: GenerationSettings,
                     state=None, task: Task = Task(), prompt_file: str | None = None, prompt_column: str | None = None,
                     progress: bool = True, scorer: SampleScorer | None = None) -> dict:
    """Generate (or finish) this task's shards of a sequence dataset; returns counts and timings. `state` is an
    accelerate PartialState (or None for one process): process r takes batches r, r + P, r + 2P, ... of the task's
    unsealed shards. The reward of a scored dataset is loaded before anything is written."""
    from tqdm.auto import tqdm

    check_fields(settings)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    main = state is None or state.is_main_process
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    root = Path(output_dir)
    golden = golden_step(pipe, settings.golden, settings.height, settings.width)
    run_config = build_run_config(pipe, settings, golden, prompt_file, prompt_column, prompts)
    if settings.scoring is not None and scorer is None:
        scorer = SampleScorer(pipe, settings.scoring, *image_size(pipe, settings.height, settings.width))
    per_shard = int(run_config["sharding"]["samples_per_shard"])
    total = F.num_shards(len(prompts), per_shard)
    mine = task.shards(total)
    held: dict[str, RunLock] = {}  # the main process holds the lock on this task's shards until the end

    def claim() -> None:
        held["lock"] = RunLock(root, "--output_dir", mine, what="shard").acquire()

    on_main(state, claim) if state is not None else claim()
    lock, removed = held.get("lock"), []
    try:
        prepare_output(root, run_config, prompts, settings, pipe, state, task, lock)
        removed = check_sealed(root, mine, rank, world)
        barrier()
        unsealed = [k for k in mine if k not in sealed_records(root, mine)]
        if unsealed and main:
            remove_index(root)
        spec = SampleSpec.of(run_config)
        plan = plan_work(root, prompts, settings.batch_size, unsealed, per_shard, spec, rank, world)
        if plan.damaged:
            logger.warning("%d staging files are damaged (%s%s) and are regenerated", len(plan.damaged),
                           ", ".join(plan.damaged[:3]), ", ..." if len(plan.damaged) > 3 else "")
        barrier()  # every damaged file is removed before any shard can look complete
        writer = StagingWriter(root)
        sealer = Sealer(root, prompts, run_config, unsealed[rank::world])
        start = time.perf_counter()
        bar = tqdm(total=plan.to_write, desc=f"golden sequences [{rank}/{world}]", unit="sample",
                   disable=not (progress and rank == 0), dynamic_ncols=True)
        try:
            compute_batches(pipe, golden, plan, settings, writer, bar, scorer, sealer.poll)
        finally:
            bar.close()
            writer.close()
        barrier()
        sealer.finish()
        elapsed = time.perf_counter() - start
        barrier()
        missing = finalize(root, run_config, SIGNATURE_KEYS) if main else None
        records = sealed_records(root, range(total)) if main else {}
    finally:
        if lock is not None:
            lock.release()
    computed = plan.to_write * settings.num_steps  # golden steps, whole batches
    evaluations = golden.counter.rows
    sealed_before = len(set(mine) - set(unsealed))
    return {"generated": plan.to_write, "already_complete": len(plan.ids) - plan.to_write + (
                sum(int(r["rows"]) for k, r in records.items() if k in mine and k not in unsealed) if main else 0),
            "damaged_files": len(plan.damaged), "damaged_shards": len(removed),
            "complete_samples": sum(int(r["rows"]) for r in records.values()) if main else None,
            "shards_sealed": sum(k in records for k in unsealed) if main else len(sealer.sealed),
            "shards_already_sealed": sealed_before, "shards_total": total,
            "shards_of_task": len(mine), "missing_shards": missing, "index_written": main and not missing,
            "seconds": elapsed, "unet_evaluations": evaluations, "denoiser": family_of(pipe).denoiser_name,
            "process_index": rank, "num_processes": world, "task": task,
            "unet_evaluations_per_golden_step": evaluations / computed if computed else None}


def finalize_dataset(output_dir: str | Path) -> dict:
    """--finalize: write index.json when every shard is sealed; else a UserError naming the missing shards."""
    root = Path(output_dir)
    run_config = read_settings(root / F.RUN_CONFIG, "--output_dir")
    if run_config is None or run_config.get("format_version") != F.FORMAT_VERSION:
        raise UserError(f"--finalize: {root} holds no stage-2 dataset of format {F.FORMAT_VERSION} "
                        f"({F.RUN_CONFIG} missing or older)")
    missing = finalize(root, run_config, SIGNATURE_KEYS)
    total = F.num_shards(int(run_config["num_prompts"]), int(run_config["sharding"]["samples_per_shard"]))
    if missing:
        raise UserError(f"--finalize: {len(missing)} of {total} shards of {root} are not sealed yet (shard(s) "
                        f"{', '.join(map(str, missing[:10]))}{', ...' if len(missing) > 10 else ''}): rerun the "
                        "run(s) that make them, then --finalize again")
    index = F.read_index(root)
    return {"shards_total": total, "complete_samples": index["num_samples"], "index_written": True}


def run_generation(job: GenerationJob, state=None) -> dict:
    """Check the output folder, read the prompts, refuse a mixed rerun, then load the model (and the reward of a
    scored dataset) and generate; nothing is written before all of them loaded."""
    if job.finalize:
        return finalize_dataset(job.output_dir) if state is None or state.is_main_process else {}
    check_writable_dir(job.output_dir, "--output_dir")  # before any prompt is read or model loaded
    if job.prompt_file is None:
        raise UserError("--prompt_file is required (unless --finalize)")
    prompts = read_prompts(job.prompt_file, job.prompt_column)[: job.max_prompts]
    task = Task.resolve(job.num_shards, job.shard_index)
    device = state.device if job.device == "auto" and state is not None else resolve_device(job.device)
    settings = replace(job.settings, dtype=model_dtype(job.settings.dtype, device))
    if settings.scoring is not None:
        settings.scoring.check()  # an unknown --score_metric fails before any model loads
    check_seeds("--start_seed", settings.start_seed, prompts[-1].index)
    check_rerun(job.output_dir, early_config(settings, prompts, torch.device(device).type), prompts,
                (*EARLY_KEYS, "sharding"), early=True)
    pipe = load_pipeline(settings.base_model_id, settings.revision, settings.variant, settings.dtype, device,
                         cpu_offload=job.enable_model_cpu_offload, vae_slicing=job.enable_vae_slicing,
                         vae_tiling=job.enable_vae_tiling)
    optimize_unet(family_of(pipe).denoiser, channels_last=job.channels_last, compile_unet=job.compile)
    scorer = None
    if settings.scoring is not None:  # a bad --score_reward_path fails here, before run_config.json is written
        scorer = SampleScorer(pipe, settings.scoring, *image_size(pipe, settings.height, settings.width))
    if state is None or state.is_main_process:
        g = settings.golden
        logger.info("Generating golden sequences: %d prompts, n=%d, N=%d, w_l=%g, w_w=%g, batch %d, %d process(es), "
                    "%s, task %d of %d", len(prompts), settings.num_steps, g.schedule_steps,
                    g.denoise_guidance_scale, g.inversion_guidance_scale, settings.batch_size,
                    state.num_processes if state else 1, device, task.index, task.count)
    return generate_dataset(pipe, prompts, job.output_dir, settings, state=state, task=task,
                            prompt_file=str(job.prompt_file), prompt_column=job.prompt_column, progress=job.progress,
                            scorer=scorer)
