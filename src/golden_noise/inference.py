"""Stages 4-5: golden noise from a trained RNN export (the `GoldenNoise` API), the oracle (the real golden
step), single-prompt settings and the sharded, resumable batch runner behind `scripts/batch_inference.py`."""
from __future__ import annotations

import csv
import io
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch

from .diffusion import encode_prompts, latent_shape, resolve_text_embedding, sample_images, seeded_noise, text_embedding
from .golden import GoldenConfig, GoldenStep
from .io import UserError, atomic_save_image, atomic_torch_save, atomic_write_json, atomic_write_text, read_prompts
from .runtime import get_logger

logger = get_logger(__name__)

METHODS = ("standard", "gnsnet", "oracle")
MANIFEST_FIELDS = ("index", "prompt", "seed", "method", "file", "seconds", "noise_seconds", "sampling_seconds")
DEFAULT_NUM_GEN_STEPS = 10  # used only when no RNN export says how many steps its data had


def load_rnn_export(path: str | os.PathLike, device=None, dtype=None):
    """Load a trained `NoiseSequenceRNN_v3` export -> (model in eval mode, meta); UserError when missing/invalid."""
    from model.rnn_seq_model_v3 import NoiseSequenceRNN_v3

    model, meta = NoiseSequenceRNN_v3.from_pretrained(str(path), device=device, dtype=dtype)
    return model.eval(), meta


def export_latent_shape(meta: dict) -> tuple[int, int, int]:
    """(C, H, W) of the noise an export was trained on."""
    rc = meta.get("run_config") or {}
    if rc.get("latent_shape"):
        return tuple(int(v) for v in rc["latent_shape"])
    mc = meta["model_config"]
    res = mc["noise_resolution"]
    h, w = (res, res) if isinstance(res, int) else tuple(res)
    return (int(mc["latent_channels"]), int(h), int(w))


def golden_config_from(run_config: dict | None, **overrides) -> GoldenConfig:
    """The golden-step parameters of a training run's data, with explicit (non-None) overrides on top."""
    names = {f.name for f in fields(GoldenConfig)}
    values = {k: v for k, v in ((run_config or {}).get("golden") or {}).items() if k in names}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in values and values[key] != value:
            logger.warning("oracle: %s=%s differs from the %s the RNN's training data used; the oracle uses %s",
                           key, value, values[key], value)
        values[key] = value
    return GoldenConfig(**values)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def oracle_noise(pipe, prompts: Sequence[str], x_T: torch.Tensor, num_steps: int, config: GoldenConfig,
                 height: int | None = None, width: int | None = None) -> torch.Tensor:
    """The real golden step applied `num_steps` times to x_T: (B, C, H, W) -> x'_n (B, C, H, W) float32.

    Uses the pipeline's own (default) scheduler config, like the data generation stage."""
    scheduler = getattr(pipe, "_default_scheduler", pipe.scheduler)
    step = GoldenStep(pipe.unet, scheduler.config, config)
    cond = encode_prompts(pipe, list(prompts), height=height, width=width)
    return step.sequence(x_T.to(pipe.unet.device, torch.float32), cond, num_steps)[:, -1]


class GoldenNoise:
    """Turn a prompt and a seed into golden initial latents for your own diffusers SDXL pipeline.

        gn = GoldenNoise.from_pretrained("output/run/rnn_v3_model_final", pipe=pipe)
        image = pipe(prompt, latents=gn(prompt, seed=0)).images[0]
    """

    def __init__(self, model, meta: dict, pipe=None, device=None):
        self.model = model
        self.meta = meta
        self.pipe = pipe
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, pipe=None, device=None, dtype=None) -> "GoldenNoise":
        """Load an export (the .safetensors, the .json, their stem or a run directory); the RNN runs on
        `device` (default: the pipeline's device, else CPU) in `dtype` (default float32)."""
        if device is None:
            device = pipe.unet.device if pipe is not None else torch.device("cpu")
        model, meta = load_rnn_export(path, device=device, dtype=dtype or torch.float32)
        gn = cls(model, meta, pipe=pipe, device=device)
        if pipe is not None:
            gn.check_pipeline(pipe)
            if gn.height and tuple(latent_shape(pipe)) != gn.latent_shape:
                logger.warning("the RNN was trained at %sx%s px, not the pipeline's default size: call "
                               "pipe(..., height=gn.height, width=gn.width)", gn.height, gn.width)
        return gn

    @property
    def run_config(self) -> dict:
        """The training dataset's run_config.json, as stored in the export."""
        return self.meta.get("run_config") or {}

    @property
    def model_config(self) -> dict:
        return self.meta.get("model_config") or {}

    @property
    def num_steps(self) -> int | None:
        """How many golden steps the training sequences held (the default rollout length)."""
        n = self.run_config.get("num_steps")
        return int(n) if n is not None else None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the noise the RNN was trained on."""
        return export_latent_shape(self.meta)

    @property
    def height(self) -> int | None:
        """Image height the training data used (pass it to `pipe(..., height=gn.height)` if not the default)."""
        return self.run_config.get("height")

    @property
    def width(self) -> int | None:
        return self.run_config.get("width")

    def _pipe(self, pipe):
        pipe = pipe if pipe is not None else self.pipe
        if pipe is None:
            raise UserError("GoldenNoise needs a pipeline for the text embedding: pass pipe= to from_pretrained "
                            "or to the call")
        return pipe

    def check_pipeline(self, pipe, height: int | None = None, width: int | None = None) -> None:
        """Raise UserError unless `pipe` at `height` x `width` uses the latent shape the RNN was trained on."""
        height, width = height or self.height, width or self.width
        have = tuple(latent_shape(pipe, height, width))
        want = self.latent_shape
        if have != want:
            size = f"{height or 'default'}x{width or 'default'}"
            raise UserError(f"the RNN export was trained on latents {list(want)}, but the pipeline at {size} px "
                            f"makes latents {list(have)}: pass --height/--width matching the training data "
                            f"({self.run_config.get('height')}x{self.run_config.get('width')}) or use an export "
                            "trained at this resolution")
        dim = self.model_config.get("text_embed_dim")
        have = resolve_text_embedding(pipe, self.text_embedding_kind)["dim"]
        if dim is not None and int(dim) != have:
            raise UserError(f"the RNN export expects {self.text_embedding_kind} text embeddings of size {dim}, but "
                            f"this pipeline's are of size {have}: use the base model the RNN was trained with "
                            f"({self.run_config.get('base_model_id', 'see its run_config')})")

    @property
    def text_embedding_kind(self) -> str:
        """What the RNN reads as text (diffusion.TEXT_EMBEDDINGS), as its training data stored it."""
        return (self.run_config.get("text_embedding") or {}).get("kind", "pooled")

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str], pipe=None) -> torch.Tensor:
        """The prompt embedding the RNN is conditioned on, computed as its training data did: (B, P) float32."""
        pipe = self._pipe(pipe)
        prompts = list(prompts)
        cond = encode_prompts(pipe, prompts, with_uncond=False)
        return text_embedding(pipe, prompts, cond, self.text_embedding_kind).to(self.device, torch.float32)

    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """x_T for each seed (B, C, H, W) float32 on CPU: what `pipe(generator=Generator().manual_seed(s))` draws."""
        return seeded_noise(list(seeds), self.latent_shape)

    @torch.no_grad()
    def rollout(self, x_T: torch.Tensor, text: torch.Tensor, num_steps: int | None = None, sample: bool = False,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Roll the RNN out from x_T (B, C, H, W) with text embeddings (B, P): -> (B, n, C, H, W) float32."""
        n = int(num_steps or self.num_steps or DEFAULT_NUM_GEN_STEPS)
        if n < 1:
            raise UserError(f"--num_gen_steps must be at least 1, got {n}")
        x = x_T.to(self.device, torch.float32)
        seq = self.model.generate_sequence(x, text.to(self.device, torch.float32), n, sample=sample,
                                           generator=generator)
        return seq.float()  # (B, n, C, H, W)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], seed: int | Sequence[int] | None = None, pipe=None,
                 latents: torch.Tensor | None = None, num_steps: int | None = None, sample: bool = False,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Golden latents (B, C, H, W) for `pipe(prompt, latents=...)`, on the pipeline's device in its dtype.

        The start noise is `latents` (B, C, H, W) if given, else drawn per prompt: an int seed s gives prompt i
        the seed s + i, a list one seed each, exactly as `pipe(prompts, generator=[torch.Generator()
        .manual_seed(s_i) ...])` draws it in float32. `sample=True` draws each step from the predicted Gaussian
        (exports trained with predict_variance) using `generator` (on the RNN's device)."""
        pipe = self._pipe(pipe)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if latents is None:
            if seed is None:
                raise UserError("pass seed= (an int, or one per prompt) or latents=")
            seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
            if len(seeds) != len(prompts):
                raise UserError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
            latents = self.initial_noise(seeds)
        golden = self.rollout(latents, self.text_embeddings(prompts, pipe), num_steps, sample, generator)[:, -1]
        return golden.to(pipe.unet.device, dtype or pipe.unet.dtype)


# ---------------------------------------------------------------- batch runner


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


# ---------------------------------------------------------------- single prompt


def prompt_slug(prompt: str, limit: int = 48) -> str:
    """A file-name-safe stem from a prompt: lower-case words joined by '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def run_single(*, rnn_weights_path: str, prompt: str, output_dir: str = "./inference_output",
               output_name: str | None = None, base_model_id: str | None = None, revision: str | None = None,
               variant: str | None = None, num_gen_steps: int | None = None, num_inference_steps: int = 30,
               guidance_scale: float = 5.5, negative_prompt: str | None = None, scheduler: str = "default",
               seed: int = 42, height: int | None = None, width: int | None = None,
               generate_standard: bool = False, generate_oracle: bool = False, sample_noise: bool = False,
               save_noise: bool = False, dtype: str = "float32", device: str = "auto") -> dict:
    """Stage 4: the golden-noise image of one prompt and seed (plus standard/oracle images on request);
    writes images, noises and `{stem}_settings.json`, and returns the settings dict."""
    settings = dict(locals())  # every flag, first: recorded in the settings JSON
    from importlib.metadata import version

    from .diffusion import DEFAULT_MODEL_ID, load_pipeline, set_scheduler
    from .io import normalize_prompt
    from .runtime import resolve_device

    text = normalize_prompt(prompt)
    if not text:
        raise UserError("--prompt is empty: pass a text prompt")
    for name, value in (("--num_inference_steps", num_inference_steps), ("--num_gen_steps", num_gen_steps or 1)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    torch_device = resolve_device(device)
    gn = GoldenNoise.from_pretrained(rnn_weights_path, device=torch_device)
    if sample_noise and not gn.model_config.get("predict_variance", False):
        raise UserError("--sample_noise needs an export trained with predict_variance; this one predicts the "
                        "mean only: drop --sample_noise")
    trained_id = gn.run_config.get("base_model_id")
    model_id = base_model_id or trained_id or DEFAULT_MODEL_ID
    if base_model_id and trained_id and base_model_id != trained_id:
        logger.warning("--base_model_id %s differs from %s, which the RNN was trained with", base_model_id, trained_id)
    pipe = load_pipeline(model_id, revision=revision, variant=variant, dtype=dtype, device=torch_device)
    set_scheduler(pipe, scheduler)
    height, width = height or gn.height, width or gn.width
    gn.check_pipeline(pipe, height, width)
    n = num_gen_steps or gn.num_steps or DEFAULT_NUM_GEN_STEPS
    if gn.num_steps and n != gn.num_steps:
        logger.warning("--num_gen_steps %d differs from the %d steps of the RNN's training sequences", n, gn.num_steps)

    x_T = seeded_noise([seed], latent_shape(pipe, height, width))  # (1, C, H, W) float32
    generator = torch.Generator(device=gn.device).manual_seed(seed) if sample_noise else None
    t0 = time.perf_counter()
    text_embed = gn.text_embeddings([text], pipe)  # (1, P)
    _sync(gn.device)
    t1 = time.perf_counter()
    golden = gn.rollout(x_T, text_embed, n, sample=sample_noise, generator=generator)[:, -1]  # (1, C, H, W)
    _sync(gn.device)
    timings = {"text_embedding_seconds": t1 - t0, "rollout_seconds": time.perf_counter() - t1}

    out = Path(output_dir)
    stem = output_name or f"{prompt_slug(text)}_seed{seed}"
    latents = {"gnsnet": golden}
    if generate_standard:
        latents["standard"] = x_T
    if generate_oracle:
        config = golden_config_from(gn.run_config)
        t0 = time.perf_counter()
        latents["oracle"] = oracle_noise(pipe, [text], x_T, n, config, height, width)
        _sync(pipe.unet.device)
        timings["oracle_seconds"] = time.perf_counter() - t0
        settings["oracle_golden"] = config.to_dict()
    files = {}
    for method, z in latents.items():
        _sync(pipe.unet.device)
        t0 = time.perf_counter()
        image = sample_images(pipe, [text], z, num_inference_steps, guidance_scale, negative_prompt, height, width)[0]
        _sync(pipe.unet.device)
        timings[f"{method}_sampling_seconds"] = time.perf_counter() - t0
        files[method] = f"{stem}_{method}.png"
        atomic_save_image(image, out / files[method])
        logger.info("saved %s", out / files[method])
    sampling = timings["gnsnet_sampling_seconds"]
    timings["rollout_over_sampling"] = timings["rollout_seconds"] / sampling
    timings["noise_over_sampling"] = (timings["rollout_seconds"] + timings["text_embedding_seconds"]) / sampling
    if save_noise:
        noises = {"source_noise": x_T[0], "golden_noise": golden[0]}
        if "oracle" in latents:
            noises["oracle_noise"] = latents["oracle"][0]
        for name, z in noises.items():
            files[name] = f"{stem}_{name}.pt"
            atomic_torch_save(z.detach().float().cpu().clone(), out / files[name])  # (C, H, W)
    settings.update({
        "prompt_used": text, "base_model_id_used": model_id, "num_gen_steps_used": n, "height_used": height,
        "width_used": width, "latent_shape": list(x_T.shape[1:]), "scheduler_class": type(pipe.scheduler).__name__,
        "device_used": str(torch_device), "files": files, "timings": timings,
        "rnn_model_config": gn.model_config, "rnn_run_config": gn.run_config,
        "versions": {pkg: version(pkg) for pkg in ("torch", "diffusers", "transformers")},
    })
    atomic_write_json(out / f"{stem}_settings.json", settings)
    logger.info("rollout %.3fs (%d steps) = %.1f%% of sampling %.3fs; settings in %s", timings["rollout_seconds"], n,
                100 * timings["rollout_over_sampling"], timings["gnsnet_sampling_seconds"],
                out / f"{stem}_settings.json")
    return settings
