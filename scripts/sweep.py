#!/usr/bin/env python
"""Where golden noise pays: batch inference and evaluation over a grid of sampling guidance scales x step counts x
rollout lengths, comparing standard noise, the RNN's golden noise (gnsnet), the one-step baselines (direct, npnet),
the real golden step (oracle) and best_of_K seeds picked by a reward, at their counted costs.

    python scripts/sweep.py --prompt_file ./data/test_prompts.txt --output_dir ./results/sweep/ \
        --rnn_weights_path ./output/rnn_v3_seq_model_output --guidance_scales 1 1.5 2 3.5 5.5 \
        --num_inference_steps 4 20 --num_gen_steps 1 2 3 --methods standard gnsnet oracle best_of_4 \
        --metrics hpsv2 --start_seed 1000000
    accelerate launch --num_processes 8 scripts/sweep.py ...   # same files; every process shares every cell
    ... --num_shards K --shard_index i      # run i of K separate runs (machines) into one folder: same files

Writes {output_dir}/sweep.csv (one row per cell and metric: mean, paired diff vs standard at the same guidance and
steps, vs the grid's best standard guidance and vs standard noise at matched compute (--standard_steps adds
standard-only step counts for it), 95% bootstrap CIs, win rates, UNet evaluations and seconds per image), reward_vs_guidance_*.png, reward_vs_cost_*.png, gain_vs_rollout_*.png and report.html; the images live in
cells/ (stage 5's layout per cell). Seeds: prompt i uses start_seed + i; best_of_K's candidate k uses
start_seed + i + k * 1,000,000 (k = 0 is the standard image itself).

Rerun the same command to resume: complete cells are skipped, interrupted ones finished, scores kept. A rerun may
ADD guidance scales, step counts, rollout lengths, methods or metrics (existing cells are reused; the table covers
the grid asked for); one with other prompts, seeds, batch size, model, dtype, sampling scheduler, negative prompt,
image size, RNN or oracle settings is refused, naming each difference, and changes no file.

K separate runs (--num_shards K --shard_index i, defaults from a Slurm job array) each make global batches i, i + K,
... of every cell; the one that finds every image there scores the cells and writes sweep.csv, the plots and
report.html (or --finalize, the same command).
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import (add_dataclass_arguments, add_list_argument, add_pipeline_arguments, argument,
                              dataclass_defaults, dataclass_from_args, parser)
from golden_noise.diffusion import DEFAULT_MODEL_ID
from golden_noise.inference.config import (PipelineSpec, SamplingConfig, add_golden_override_arguments,
                                          golden_overrides_from_args)
from golden_noise.methods import METHOD_HELP, is_method
from golden_noise.rewards.base import PLUGIN_HELP, available_rewards, is_reward_name
from golden_noise.runtime import distributed_state, end_distributed, resolve_device, run_cli, setup_logging
from golden_noise.sweep.job import GRID_FIELDS, SweepJob
from golden_noise.evaluation import build_metrics
from golden_noise.sweep.report import findings
from golden_noise.sweep.run import run_sweep

QUICK_PROMPTS, QUICK_BOOTSTRAP = 48, 2000


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    defaults = dataclass_defaults(SweepJob)
    g = p.add_argument_group("data")
    g.add_argument("--prompt_file", required=True, help="prompts: .txt (one per line) or .csv/.tsv (see "
                   "--prompt_column); use prompts (and seeds) the RNN never saw in training")
    add_dataclass_arguments(g, SweepJob, include=("prompt_column", "max_prompts", "output_dir", "start_seed",
                                                  "batch_size"))
    g.add_argument("--quick", action="store_true", help=f"a fast look at the same grid: the first {QUICK_PROMPTS} "
                   f"prompts (unless --max_prompts) and {QUICK_BOOTSTRAP} bootstrap resamples (unless "
                   "--bootstrap_samples); its own --output_dir, since the prompts differ")
    g = p.add_argument_group("grid (lists take `a b` or `a,b`)")
    add_dataclass_arguments(g, SweepJob, include=("guidance_scales", "num_inference_steps", "standard_steps",
                                                  "num_gen_steps"))
    add_list_argument(g, "--methods", default=defaults["methods"], metavar="METHOD", valid=is_method,
                      valid_help=METHOD_HELP, help=SweepJob.__dataclass_fields__["methods"].metadata["help"])
    g = p.add_argument_group("metrics")
    metric_help = f"choose from {', '.join(available_rewards())} or {PLUGIN_HELP}"
    add_list_argument(g, "--metrics", default=["hpsv2"], metavar="METRIC", valid=is_reward_name,
                      valid_help=metric_help, help=f"reward models, e.g. --metrics hpsv2 pickscore: {metric_help}")
    g.add_argument("--reward_path", action="append", default=None, metavar="METRIC=PATH",
                   help="local model file/folder (or hub id) of a metric, e.g. toy_attributes=worlds/toy_shapes; "
                   "repeatable")
    add_dataclass_arguments(g, SweepJob, include=("selection_metric",))
    argument(g, "--reward_batch_size", type=int, default=32, help="images per reward forward pass", min=1)
    add_dataclass_arguments(g, SweepJob, include=("bootstrap_samples", "seed", "image_rows"),
                            defaults={"bootstrap_samples": None},
                            helps={"bootstrap_samples": f"bootstrap resamples of each 95%% CI (default "
                                   f"{defaults['bootstrap_samples']}; {QUICK_BOOTSTRAP} with --quick)"})
    g.add_argument("--no_progress", action="store_true", help="no progress bar while scoring")
    g = p.add_argument_group("models")
    add_dataclass_arguments(g, SweepJob, include=("rnn_weights_path", "direct_weights", "npnet_weights"))
    add_pipeline_arguments(g, None, f"diffusers pipeline (hub id or local dir); default: the RNN's, else "
                           f"{DEFAULT_MODEL_ID}")
    add_dataclass_arguments(p.add_argument_group("sampling (the same in every cell)"), SamplingConfig,
                            exclude=GRID_FIELDS)
    g = p.add_argument_group("oracle's golden step (default: the RNN's training data, else NPNet's)")
    add_golden_override_arguments(g)
    add_dataclass_arguments(p.add_argument_group("shards and machines"), SweepJob,
                            include=("num_shards", "shard_index", "finalize"))
    args = p.parse_args(argv)  # the flags' ranges are their fields' (SweepJob, SamplingConfig, GoldenConfig)
    if args.quick:
        args.max_prompts = args.max_prompts or QUICK_PROMPTS
        args.bootstrap_samples = args.bootstrap_samples or QUICK_BOOTSTRAP
    args.bootstrap_samples = args.bootstrap_samples or defaults["bootstrap_samples"]
    return args


def job_from_args(args: argparse.Namespace) -> SweepJob:
    """The sweep the flags describe (flag errors are UserErrors)."""
    metrics = build_metrics(args.metrics, args.reward_path, resolve_device(args.device), None,
                            args.reward_batch_size)
    return dataclass_from_args(SweepJob, args, metrics=metrics, golden_overrides=golden_overrides_from_args(args),
                               sampling=dataclass_from_args(SamplingConfig, args,  # per cell: its guidance, steps
                                                            guidance_scale=args.guidance_scales[0],
                                                            num_inference_steps=args.num_inference_steps[0]),
                               pipeline=dataclass_from_args(PipelineSpec, args), progress=not args.no_progress)


def main(args: argparse.Namespace) -> dict | None:
    state = distributed_state()
    setup_logging(state.is_main_process)
    result = run_sweep(job_from_args(args), state)
    if result is not None and "table" in result:  # (a task whose folder misses other tasks' images: logged)
        print(result["table"])
        print("\n\n".join(f.text() for f in findings(result["rows"])))
        print(f"wrote {result['csv']}, {len(result['plots'])} plots and {result['report']}")
    end_distributed(state)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
