"""What a sweep is asked to do (`SweepJob`, filled by scripts/sweep.py from its flags), the checks that run before
any model loads, and the settings a rerun into the same --output_dir must keep."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..cli import SEED_RULES, check_fields, rerun_fields, rerun_keys, setting
from ..errors import UserError
from ..evaluation import Metric
from ..inference.batch import BatchJob
from ..inference.config import PipelineSpec, SamplingConfig, resolve_num_gen_steps
from ..methods import LEARNED, METHOD_HELP, best_of_k, is_method
from .grid import GOLDEN, SEED_STRIDE, Unit
from ..inference.api import golden_config_from
from ..rewards.base import reward_factory
from ..runs import Task, finalize_setting, num_shards_setting, shard_index_setting

SETTINGS_FILE = "sweep_settings.json"
PROMPTS_FILE = "prompts.txt"  # the prompts the sweep uses (after --max_prompts), one per line, by index
GRID_FIELDS = ("guidance_scale", "num_inference_steps")  # SamplingConfig fields each cell sets from the grid


@dataclass
class SweepJob:
    """A grid of guidance scales x sampling steps x rollout lengths x methods, scored by reward metrics.

    A field's `rerun` keys are what sweep_settings.json records of it that a rerun into the same --output_dir must
    keep: everything that shapes a cell's pixels (the grid, the methods and the metrics may grow); the sampling
    settings but the grid's are the same in every cell."""

    prompt_file: str = setting(rerun="prompt_fingerprint")
    output_dir: str = setting("./results/sweep", "folder of the cells, sweep.csv, plots and report.html")
    guidance_scales: list[float] = setting(help="sampling CFG scales (diffusers applies none for a scale <= 1)",
                                           default_factory=lambda: [1.0, 5.5], min=0)
    num_inference_steps: list[int] = setting(help="sampling step counts", default_factory=lambda: [30], min=1)
    standard_steps: list[int] = setting(help="more sampling step counts made with standard noise only, at every "
                                        "guidance scale: candidates for the matched-compute comparison (e.g. 21 23 "
                                        "beside 20)", default_factory=list, min=1)
    num_gen_steps: list[int] | None = setting(None, "rollout lengths n of gnsnet and oracle (default: the n of the "
                                              "RNN's training sequences, else 10)", min=1)
    methods: list[str] = setting(help=f"methods: {METHOD_HELP}; standard is always made (every comparison's "
                                 "baseline)", default_factory=lambda: ["standard", "gnsnet", "oracle", "best_of_4"])
    metrics: list[Metric] = setting(default_factory=list)  # the CLI builds them from --metrics / --reward_path
    selection_metric: str | None = setting(None, "the metric best_of_K selects by (default: the first of --metrics)")
    prompt_column: str | None = setting(None, "column of a .csv/.tsv prompt file (default: prompt or caption)")
    max_prompts: int | None = setting(None, "use only the first N prompts of the file", min=1)
    start_seed: int = setting(0, "seed of prompt index i = start_seed + i; best_of_K's candidate k: + k * "
                              f"{SEED_STRIDE:,}", rerun=("start_seed", "seed_stride"), **SEED_RULES)
    batch_size: int = setting(8, "prompts per pipeline call (part of the settings: pixels depend on batch-mates)",
                              min=1, rerun=True)
    rnn_weights_path: str | None = setting(None, "trained RNN export or hub repo id owner/name (needed for gnsnet; "
                                           "its training data also sets the oracle's golden step, n and the image "
                                           "size)", rerun=("rnn_sha256", "rnn_config_sha256"),  # its identity
                                           when_unused=("rnn_sha256", "rnn_config_sha256"))
    direct_weights: str | None = setting(None, "trained direct-model export (needed for direct: train_rnn_model_v3.py "
                                         "--model_type DirectNoiseModel); its cells have the n it predicts",
                                         rerun=("direct_sha256", "direct_config_sha256"),
                                         when_unused=("direct_sha256", "direct_config_sha256"))
    npnet_weights: str | None = setting(None, "NPNet weights (needed for npnet): an export of train_rnn_model_v3.py "
                                        "--model_type NPNet, or NPNet's released SDXL checkpoint (.pth); its cells "
                                        "have the n it predicts", rerun=("npnet_sha256", "npnet_config_sha256"),
                                        when_unused=("npnet_sha256", "npnet_config_sha256"))
    golden_overrides: dict = setting(default_factory=dict, rerun="golden", when_unused="golden")  # GoldenConfig
    # fields for the oracle (else the RNN's)
    sampling: SamplingConfig = setting(default_factory=SamplingConfig)  # per cell: the GRID_FIELDS replaced
    pipeline: PipelineSpec = setting(default_factory=PipelineSpec)
    bootstrap_samples: int = setting(10000, "bootstrap resamples of each 95%% CI", min=1)
    seed: int = setting(0, "seed of the bootstrap", **SEED_RULES)
    image_rows: int = setting(4, "prompts shown as image rows per (guidance, steps) in report.html", min=0)
    num_shards: int | None = num_shards_setting("every cell's global batches (into one --output_dir)",
                                                "batches i, i + K, i + 2K, ... of every cell")
    shard_index: int | None = shard_index_setting()
    finalize: bool = finalize_setting("make no image: score the cells and write sweep.csv, the plots and report.html "
                                      "once every cell's images are there (the run that finds them all does this "
                                      "itself); name the missing images otherwise")
    progress: bool = True

    @property
    def selection(self) -> str:
        """The name of the metric best_of_K selects by."""
        return self.selection_metric or self.metrics[0].name


# What a rerun must keep (sweep_settings.json's keys), derived from the fields' metadata: known before any model
# loads, known once loaded, and None when this run has no oracle / gnsnet cells (then the earlier run's kept)
EARLY_KEYS = rerun_keys(SweepJob, exclude=GRID_FIELDS)
LOADED_KEYS = rerun_keys(SweepJob, "loaded", exclude=GRID_FIELDS)
KEPT_WHEN_UNUSED = rerun_keys(SweepJob, "when_unused")
SAMPLER_FIELDS = rerun_fields(SamplingConfig, exclude=GRID_FIELDS)  # recorded as given: the same in every cell


def check_job(job: SweepJob) -> None:
    """Flag errors that need no file or model, each a UserError naming the flag."""
    bad = [m for m in job.methods if not is_method(m)]
    if bad:
        raise UserError(f"unknown --methods {', '.join(bad)}: choose from {METHOD_HELP}")
    for method, (_, flag) in LEARNED.items():
        if method in job.methods and not getattr(job, flag):
            raise UserError(f"--methods {method} needs --{flag} (a trained export); or drop {method}")
    if not job.metrics:
        raise UserError("--metrics is empty: name at least one reward metric")
    names = [m.name for m in job.metrics]
    if len(set(names)) != len(names):
        raise UserError(f"--metrics {' '.join(m.reward for m in job.metrics)} names a metric twice")
    if job.selection_metric is not None and job.selection_metric not in names:
        raise UserError(f"--selection_metric {job.selection_metric} is not one of --metrics ({', '.join(names)}): "
                        "best_of_K selects by one of the metrics it is evaluated with")
    check_fields(job)
    job.sampling.check()
    golden_config_from(None, **job.golden_overrides)  # refuses golden-step values out of range, naming the flag
    for metric in job.metrics:  # an unknown name or a bad FILE.py:NAME fails now, before any model loads
        reward_factory(metric.reward)


def rollout_lengths(job: SweepJob, gn) -> list[int]:
    """n values of the gnsnet and oracle cells: --num_gen_steps, else the n of `gn`'s training data (the RNN's, else
    a one-step model's), else 10."""
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


def unit_job(job: SweepJob, unit: Unit, prompt_file: Path, out: Path, task: Task = Task()) -> BatchJob:
    """The stage-5 job that makes a unit's images (`task`'s share of its global batches): the one place where a
    cell's sampling settings are set."""
    sampling = dataclasses.replace(job.sampling, guidance_scale=unit.guidance_scale,
                                   num_inference_steps=unit.num_inference_steps)
    return BatchJob(prompt_file=str(prompt_file), output_base_dir=str(unit.folder(out)), methods=[unit.method],
                    start_seed=job.start_seed + unit.seed_offset, batch_size=job.batch_size,
                    rnn_weights_path=job.rnn_weights_path, direct_weights=job.direct_weights,
                    npnet_weights=job.npnet_weights, num_gen_steps=unit.num_gen_steps,
                    golden_overrides=dict(job.golden_overrides), sampling=sampling, pipeline=job.pipeline,
                    num_shards=task.count, shard_index=task.index)  # the sweep's task, resolved once


def uses_best_of(job: SweepJob) -> bool:
    return any(best_of_k(m) for m in job.methods)
