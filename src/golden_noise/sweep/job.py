"""What a sweep is asked to do (`SweepJob`, filled by scripts/sweep.py from its flags), the checks that run before
any model loads, and the settings a rerun into the same --output_dir must keep."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..evaluation import Metric
from ..inference.batch import BatchJob
from ..inference.config import PipelineSpec, SamplingConfig
from ..methods import METHOD_HELP, best_of_k, is_method
from .grid import GOLDEN, SEED_STRIDE, Unit

SETTINGS_FILE = "sweep_settings.json"
PROMPTS_FILE = "prompts.txt"  # the prompts the sweep uses (after --max_prompts), one per line, by index
# what a rerun must keep: everything that shapes a cell's pixels (the grid, the methods and the metrics may grow)
SAMPLER_KEYS = ("scheduler", "timestep_spacing", "sampling_model_id", "sampling_unet", "sampling_lora",
                "sampling_lora_scale")  # the separate sampler: the same in every cell
EARLY_KEYS = ("prompt_fingerprint", "start_seed", "seed_stride", "batch_size", "negative_prompt", *SAMPLER_KEYS,
              "height", "width", "base_model_id_used", "revision", "variant", "dtype_used", "device_type",
              "enable_vae_slicing", "enable_vae_tiling", "golden", "rnn_sha256", "rnn_config_sha256")
# None when this run has no oracle / gnsnet cells; rnn_config_sha256 also in folders made before it was recorded
KEPT_WHEN_UNUSED = ("golden", "rnn_sha256", "rnn_config_sha256")


def _f(default=dataclasses.MISSING, text: str = "", **kw):
    if "default_factory" in kw:
        return field(default_factory=kw.pop("default_factory"), metadata={"help": text, **kw})
    return field(default=default, metadata={"help": text, **kw})


@dataclass
class SweepJob:
    """A grid of guidance scales x sampling steps x rollout lengths x methods, scored by reward metrics."""

    prompt_file: str
    output_dir: str = _f("./results/sweep", "folder of the cells, sweep.csv, plots and report.html")
    guidance_scales: list[float] = _f(text="sampling CFG scales (diffusers applies none for a scale <= 1)",
                                      default_factory=lambda: [1.0, 5.5])
    num_inference_steps: list[int] = _f(text="sampling step counts", default_factory=lambda: [30])
    num_gen_steps: list[int] | None = _f(None, "rollout lengths n of gnsnet and oracle (default: the n of the RNN's "
                                         "training sequences, else 10)")
    methods: list[str] = _f(text=f"methods: {METHOD_HELP}; standard is always made (every comparison's baseline)",
                            default_factory=lambda: ["standard", "gnsnet", "oracle", "best_of_4"])
    metrics: list[Metric] = field(default_factory=list)  # the CLI builds them from --metrics / --reward_path
    selection_metric: str | None = _f(None, "the metric best_of_K selects by (default: the first of --metrics)")
    prompt_column: str | None = _f(None, "column of a .csv/.tsv prompt file (default: prompt or caption)")
    max_prompts: int | None = _f(None, "use only the first N prompts of the file")
    start_seed: int = _f(0, "seed of prompt index i = start_seed + i; best_of_K's candidate k: + k * "
                         f"{SEED_STRIDE:,}")
    batch_size: int = _f(8, "prompts per pipeline call (part of the settings: pixels depend on batch-mates)")
    rnn_weights_path: str | None = _f(None, "trained RNN export or hub repo id owner/name (needed for gnsnet; its "
                                      "training data also sets the oracle's golden step, n and the image size)")
    golden_overrides: dict = field(default_factory=dict)  # GoldenConfig fields for the oracle (else the RNN's)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # per cell: guidance and steps replaced
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)
    bootstrap_samples: int = _f(10000, "bootstrap resamples of each 95%% CI")
    seed: int = _f(0, "seed of the bootstrap")
    image_rows: int = _f(4, "prompts shown as image rows per (guidance, steps) in report.html")
    progress: bool = True

    @property
    def selection(self) -> str:
        """The name of the metric best_of_K selects by."""
        return self.selection_metric or self.metrics[0].name


def check_job(job: SweepJob) -> None:
    """Flag errors that need no file or model, each a UserError naming the flag."""
    from ..inference.api import check_guidance_scale, golden_config_from
    from ..rewards.base import reward_factory

    bad = [m for m in job.methods if not is_method(m)]
    if bad:
        raise UserError(f"unknown --methods {', '.join(bad)}: choose from {METHOD_HELP}")
    if "gnsnet" in job.methods and not job.rnn_weights_path:
        raise UserError("--methods gnsnet needs --rnn_weights_path (a trained RNN export); or drop gnsnet")
    if not job.metrics:
        raise UserError("--metrics is empty: name at least one reward metric")
    names = [m.name for m in job.metrics]
    if len(set(names)) != len(names):
        raise UserError(f"--metrics {' '.join(m.reward for m in job.metrics)} names a metric twice")
    if job.selection_metric is not None and job.selection_metric not in names:
        raise UserError(f"--selection_metric {job.selection_metric} is not one of --metrics ({', '.join(names)}): "
                        "best_of_K selects by one of the metrics it is evaluated with")
    for flag, values in (("--num_inference_steps", job.num_inference_steps), ("--num_gen_steps", job.num_gen_steps),
                         ("--batch_size", [job.batch_size]), ("--max_prompts", [job.max_prompts])):
        low = [v for v in values or [] if v is not None and v < 1]
        if low:
            raise UserError(f"{flag} must be at least 1, got {low[0]}")
    for w in job.guidance_scales:
        check_guidance_scale("--guidance_scales", w)
    job.sampling.check()
    golden_config_from(None, **job.golden_overrides)  # refuses negative golden-step scales, naming the flag
    for metric in job.metrics:  # an unknown name or a bad FILE.py:NAME fails now, before any model loads
        reward_factory(metric.reward)


def rollout_lengths(job: SweepJob, gn) -> list[int]:
    """n values of the gnsnet and oracle cells: --num_gen_steps, else the RNN's training n, else 10."""
    from ..inference.config import resolve_num_gen_steps

    if not any(m in GOLDEN for m in job.methods):
        return []
    return list(dict.fromkeys(job.num_gen_steps or [resolve_num_gen_steps(None, gn)]))


def metric_record(metrics) -> dict:
    """{name: {reward, path}}: what a metric's scores mean (a rerun may add metrics, not change one)."""
    return {m.name: {"reward": m.reward, "path": None if m.options.get("path") is None else str(m.options["path"])}
            for m in metrics}


def refuse_changed_metrics(path: Path, old: dict | None, metrics) -> None:
    """A rerun may add metrics; one whose name now means another reward or model path is refused."""
    if not old:
        return
    diffs = [f"{name}: {old['metrics'][name]} -> {new}" for name, new in metric_record(metrics).items()
             if name in (old.get("metrics") or {}) and old["metrics"][name] != new]
    if diffs:
        raise UserError(f"{path.parent} holds scores of metrics of the same name made with another reward "
                        f"({'; '.join(diffs)}): rerun with the same --metrics / --reward_path, or choose another "
                        "--output_dir")


def unit_job(job: SweepJob, unit: Unit, prompt_file: Path, out: Path) -> BatchJob:
    """The stage-5 job that makes a unit's images: the one place where a cell's sampling settings are set."""
    sampling = dataclasses.replace(job.sampling, guidance_scale=unit.guidance_scale,
                                   num_inference_steps=unit.num_inference_steps)
    return BatchJob(prompt_file=str(prompt_file), output_base_dir=str(unit.folder(out)), methods=[unit.method],
                    start_seed=job.start_seed + unit.seed_offset, batch_size=job.batch_size,
                    rnn_weights_path=job.rnn_weights_path, num_gen_steps=unit.num_gen_steps,
                    golden_overrides=dict(job.golden_overrides), sampling=sampling, pipeline=job.pipeline)


def uses_best_of(job: SweepJob) -> bool:
    return any(best_of_k(m) for m in job.methods)
