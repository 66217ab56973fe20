"""Stage 2: the golden-noise sequence dataset (x_T, x'_1 ... x'_n per prompt), batched, sharded and resumable.

Layout of a dataset directory (DESIGN.md "file contracts"):
    sequences/{id}_source.pt            x_T                        (C, H, W)
    sequences/{id}_golden_sequence.pt   x'_1 ... x'_n              (n, C, H, W)
    sequences/{id}_text.pt              text embedding (--text_embedding)  (P,)
    sequences/{id}_prompt_embeds.pt     token embeddings (opt.)    (77, D)
    metadata.csv                        one row per complete sample, sorted by id
    run_config.json                     every parameter that shaped the data
A sample is complete when all its files exist; each file appears atomically, so a killed run leaves only
complete files, and a rerun of the same command finishes the job.
"""
from __future__ import annotations

import csv
import io
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .diffusion import (count_long_prompts, encode_prompts, image_size, latent_shape, resolve_text_embedding,
                        seeded_noise, text_embedding)
from .golden import GoldenConfig, GoldenStep
from .errors import UserError
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .prompts import Prompt
from .runtime import get_logger, resolve_dtype

logger = get_logger(__name__)

FORMAT_VERSION = 1
METADATA_FIELDS = ["id", "prompt", "seed", "num_steps", "source_noise_file", "golden_sequence_file",
                   "text_embedding_file"]
# run_config keys that must agree for a rerun to add to an existing dataset.
SIGNATURE_KEYS = ["format_version", "base_model_id", "revision", "variant", "pipeline_class", "scheduler_config",
                  "golden", "num_steps", "height", "width", "latent_shape", "dtype", "storage_dtype",
                  "text_embedding", "save_prompt_embeds", "start_seed"]


@dataclass
class GenerationSettings:
    """What shapes a sequence dataset (besides the prompts)."""

    base_model_id: str
    num_steps: int = 10
    golden: GoldenConfig = field(default_factory=GoldenConfig)
    height: int | None = None
    width: int | None = None
    start_seed: int = 0
    dtype: str = "float32"
    storage_dtype: str = "float16"
    save_prompt_embeds: bool = False
    text_embedding: str = "auto"  # see diffusion.TEXT_EMBEDDINGS
    revision: str | None = None
    variant: str | None = None


def sample_files(sample_id: int, save_prompt_embeds: bool) -> dict[str, str]:
    """Paths of one sample's files, relative to the dataset directory."""
    files = {"source_noise_file": f"sequences/{sample_id}_source.pt",
             "golden_sequence_file": f"sequences/{sample_id}_golden_sequence.pt",
             "text_embedding_file": f"sequences/{sample_id}_text.pt"}
    if save_prompt_embeds:
        files["prompt_embeds_file"] = f"sequences/{sample_id}_prompt_embeds.pt"
    return files


def is_complete(root: Path, sample_id: int, save_prompt_embeds: bool) -> bool:
    return all((root / f).is_file() for f in sample_files(sample_id, save_prompt_embeds).values())


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def build_run_config(pipe, settings: GenerationSettings, golden: GoldenStep, prompt_file: str | None = None,
                     prompt_column: str | None = None) -> dict:
    """The dataset's run_config.json: every parameter that shaped the data."""
    height, width = image_size(pipe, settings.height, settings.width)
    return {
        "format_version": FORMAT_VERSION,
        "base_model_id": settings.base_model_id,
        "revision": settings.revision,
        "variant": settings.variant,
        "pipeline_class": type(pipe).__name__,
        "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
        "golden": {**settings.golden.to_dict(), "t0": golden.t0, "t_prev": golden.t_prev,
                   "coefficient": round(golden.coefficient, 8)},
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
        "versions": package_versions(),
    }


def check_compatible(path: Path, new: dict) -> None:
    """Refuse to add to a dataset made with other parameters, naming every difference."""
    import json

    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): remove the directory or choose another --output_dir") from None
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in SIGNATURE_KEYS if old.get(k) != _jsonable(new.get(k))]
    if diffs:
        raise UserError(f"{path.parent} holds a dataset made with other parameters ({'; '.join(diffs)}): "
                        "rerun with the same flags or choose another --output_dir")


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))


def global_batches(prompts: Sequence[Prompt], batch_size: int) -> list[list[Prompt]]:
    """Fixed batches over the whole prompt list: a sample is always computed in the same batch, whatever
    the process count or resume point, so datasets are byte-identical across runs."""
    return [list(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]


def write_metadata(root: Path, prompts: Sequence[Prompt], settings: GenerationSettings) -> int:
    """Write metadata.csv (sorted by id) for every complete sample; return the number of rows."""
    fields = METADATA_FIELDS + (["prompt_embeds_file"] if settings.save_prompt_embeds else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    rows = 0
    for p in sorted(prompts, key=lambda p: p.index):
        if is_complete(root, p.index, settings.save_prompt_embeds):
            writer.writerow({"id": p.index, "prompt": p.text, "seed": settings.start_seed + p.index,
                             "num_steps": settings.num_steps, **sample_files(p.index, settings.save_prompt_embeds)})
            rows += 1
    atomic_write_text(root / "metadata.csv", buf.getvalue())
    return rows


def remove_stale_temp_files(root: Path) -> int:
    """Delete temporary files a killed run left behind (they are never read)."""
    stale = list((root / "sequences").glob(".*.tmp")) if (root / "sequences").is_dir() else []
    for f in stale:
        f.unlink(missing_ok=True)
    return len(stale)


class SequenceDatasetWriter:
    """Writes samples on a background thread so file I/O overlaps the next batch's UNet work."""

    def __init__(self, root: Path, storage_dtype: torch.dtype, save_prompt_embeds: bool):
        self.root, self.storage_dtype, self.save_prompt_embeds = root, storage_dtype, save_prompt_embeds
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.pending: list[Future] = []

    def submit(self, sample_id: int, source, sequence, text, prompt_embeds=None) -> None:
        # .clone(): a saved view would carry its whole batch's storage.
        tensors = {"source_noise_file": source, "golden_sequence_file": sequence, "text_embedding_file": text}
        if self.save_prompt_embeds:
            tensors["prompt_embeds_file"] = prompt_embeds
        tensors = {k: v.detach().to("cpu", self.storage_dtype).clone() for k, v in tensors.items()}
        self.pending.append(self.pool.submit(self._write, sample_id, tensors))
        self._reap(block=len(self.pending) > 4)

    def _write(self, sample_id: int, tensors: dict) -> None:
        files = sample_files(sample_id, self.save_prompt_embeds)
        # the golden sequence last: with it, the sample is complete
        for key in sorted(tensors, key=lambda k: k == "golden_sequence_file"):
            atomic_torch_save(tensors[key], self.root / files[key])

    def _reap(self, block: bool) -> None:
        while self.pending and (block or self.pending[0].done()):
            self.pending.pop(0).result()  # re-raises a writer error (e.g. full disk) in the main thread
            block = block and len(self.pending) > 2

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


@torch.no_grad()
def generate_dataset(pipe, prompts: Sequence[Prompt], output_dir: str | Path, settings: GenerationSettings,
                     batch_size: int = 8, state=None, prompt_file: str | None = None,
                     prompt_column: str | None = None, progress: bool = True) -> dict:
    """Generate (or finish) a sequence dataset; returns counts and timings. `state` is an accelerate
    PartialState (or None for one process): process r takes global batches r, r + P, r + 2P, ..."""
    from tqdm.auto import tqdm

    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    is_main = rank == 0
    barrier = state.wait_for_everyone if state is not None else (lambda: None)
    root = Path(output_dir)
    golden = GoldenStep(pipe.unet, pipe.scheduler.config, settings.golden)
    run_config = build_run_config(pipe, settings, golden, prompt_file, prompt_column)
    config_path = root / "run_config.json"
    if config_path.exists():
        check_compatible(config_path, run_config)  # every process checks, so all fail alike
    barrier()
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if not config_path.exists():
            atomic_write_json(config_path, run_config)
        stale = remove_stale_temp_files(root)
        if stale:
            logger.info("removed %d temporary files left by an interrupted run", stale)
        long = count_long_prompts(pipe, [p.text for p in prompts])
        if long:
            logger.warning("%d of %d prompts exceed the %d-token CLIP window and are truncated", long, len(prompts),
                           pipe.tokenizer.model_max_length)
    barrier()

    shape = latent_shape(pipe, settings.height, settings.width)
    height, width = image_size(pipe, settings.height, settings.width)
    storage = resolve_dtype(settings.storage_dtype)
    need_uncond = any(w != 1.0 for w in (settings.golden.denoise_guidance_scale,
                                         settings.golden.inversion_guidance_scale))
    batches = global_batches(prompts, batch_size)[rank::world]
    todo = [[p for p in b if not is_complete(root, p.index, settings.save_prompt_embeds)] for b in batches]
    todo_batches = [(b, t) for b, t in zip(batches, todo) if t]
    n_todo = sum(len(t) for _, t in todo_batches)
    n_done_before = sum(len(b) for b in batches) - n_todo
    writer = SequenceDatasetWriter(root, storage, settings.save_prompt_embeds)
    start = time.perf_counter()
    bar = tqdm(total=n_todo, desc=f"golden sequences [{rank}/{world}]", unit="sample",
               disable=not (progress and is_main), dynamic_ncols=True)
    try:
        for batch, missing in todo_batches:
            # the whole fixed batch is recomputed so each sample sees the same batch composition
            texts = [p.text for p in batch]
            cond = encode_prompts(pipe, texts, height=height, width=width, with_uncond=need_uncond)
            x_t = seeded_noise([settings.start_seed + p.index for p in batch], shape, device=pipe.unet.device)
            seq = golden.sequence(x_t, cond, settings.num_steps)  # (B, n, C, H, W)
            missing_ids = {p.index for p in missing}
            # one device->host copy per batch and tensor, not a synchronising copy per sample
            x_host, seq_host = x_t.to("cpu", storage), seq.to("cpu", storage)
            text_host = text_embedding(pipe, texts, cond, settings.text_embedding).to("cpu", storage)
            embeds_host = cond.cond_embeds.to("cpu", storage) if settings.save_prompt_embeds else None
            for i, p in enumerate(batch):
                if p.index in missing_ids:
                    writer.submit(p.index, x_host[i], seq_host[i], text_host[i],
                                  embeds_host[i] if embeds_host is not None else None)
            bar.update(len(missing))
    finally:
        bar.close()
        writer.close()
    elapsed = time.perf_counter() - start
    barrier()
    rows = write_metadata(root, prompts, settings) if is_main else None
    computed = sum(len(b) for b, _ in todo_batches) * settings.num_steps  # golden steps, whole batches
    evaluations = golden.counter.evaluations
    return {"generated": n_todo, "already_complete": n_done_before, "metadata_rows": rows, "seconds": elapsed,
            "unet_evaluations": evaluations, "process_index": rank, "num_processes": world,
            "unet_evaluations_per_golden_step": evaluations / computed if computed else None}
