#!/usr/bin/env python
"""Stage 5: images for every prompt of a file, from the standard noise, the RNN's golden noise (gnsnet), the one-step
baselines' (direct, npnet) and/or the oracle (the real golden step applied n times), into
{output_base_dir}/{method}_output/{index}.png.

    python scripts/batch_inference.py --prompt_file ./data/test_prompts.txt --output_base_dir ./inference_output/ \
        --rnn_weights_path ./output/rnn_v3_seq_model_output/rnn_v3_model_final --start_seed 1000
    accelerate launch --num_processes 8 scripts/batch_inference.py ...   # same files, 8 GPUs
    ... --num_shards K --shard_index i      # run i of K separate runs (machines) into one folder: same files

index = the prompt's 0-based line number, seed = --start_seed + index. Rerun the same command to resume:
existing images are kept (a batch with some missing is recomputed whole, so with the same --batch_size the
results depend neither on where a run stopped nor on the process count); a rerun may add --methods, but one
with other prompts or settings (--batch_size included) is refused. With an RNN export the oracle's golden-step
parameters come from its training data; a golden-step flag that contradicts them warns and wins.
K separate runs (--num_shards K --shard_index i, defaults from a Slurm job array) each make global batches i, i + K,
...; the one that finds every image there writes manifest.csv and summary.json (or --finalize, the same command).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from golden_noise.cli import (add_dataclass_arguments, add_list_argument, add_pipeline_arguments, dataclass_defaults,
                              dataclass_from_args)
from golden_noise.cli import parser as make_parser
from golden_noise.diffusion import DEFAULT_MODEL_ID
from golden_noise.golden import GoldenConfig
from golden_noise.inference.batch import BatchJob, log_summary, run_batch
from golden_noise.inference.config import (PipelineSpec, add_golden_override_arguments, add_sampling_arguments,
                                          golden_overrides_from_args, sampling_from_args)
from golden_noise.methods import METHODS
from golden_noise.runtime import distributed_state, end_distributed, run_cli, setup_logging


def golden_flag_helps() -> dict[str, str]:
    """Help of each GoldenConfig flag as an oracle override (its own help, if any, and where the default comes from)."""
    helps = {}
    for f in dataclasses.fields(GoldenConfig):
        what = f.metadata.get("help", f.name.replace("_", " "))
        helps[f.name] = f"oracle: {what} (default: the RNN's training data, else {f.default})"
    return helps


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--prompt_file", required=True,
                   help="prompts: .txt (one per line) or .csv/.tsv (see --prompt_column)")
    add_list_argument(g, "--methods", choices=METHODS, default=dataclass_defaults(BatchJob)["methods"],
                      help="which noises to sample from: standard (x_T), gnsnet (the RNN's), direct (the one-step "
                           "model's), npnet (NPNet's) and/or oracle (`a b` or `a,b`)")
    add_dataclass_arguments(g, BatchJob, include=("output_base_dir", "prompt_column", "start_seed", "batch_size",
                                                  "save_noise"))
    g = p.add_argument_group("models")
    add_dataclass_arguments(g, BatchJob, include=("rnn_weights_path", "predict_variance", "direct_weights",
                                                  "npnet_weights"))
    add_pipeline_arguments(g, None, f"diffusers pipeline (hub id or local dir); default: the RNN's, else "
                           f"{DEFAULT_MODEL_ID}")
    add_sampling_arguments(p.add_argument_group("sampling"))
    g = p.add_argument_group("golden noise")
    add_dataclass_arguments(g, BatchJob, include=("num_gen_steps",))
    add_golden_override_arguments(g, helps=golden_flag_helps())
    add_dataclass_arguments(p.add_argument_group("shards and machines"), BatchJob,
                            include=("num_shards", "shard_index", "finalize"))
    return p.parse_args(argv)  # the flags' ranges are their fields' (BatchJob, SamplingConfig, GoldenConfig)


def job_from_args(args: argparse.Namespace) -> BatchJob:
    """The stage-5 job the flags describe."""
    return dataclass_from_args(BatchJob, args, golden_overrides=golden_overrides_from_args(args),
                               sampling=sampling_from_args(args),
                               pipeline=dataclass_from_args(PipelineSpec, args))


def main(args: argparse.Namespace) -> dict | None:
    from pathlib import Path

    state = distributed_state()
    setup_logging(state.is_main_process)
    job = job_from_args(args)
    summary = run_batch(job, state)
    if summary is not None:
        log_summary(summary, Path(job.output_base_dir))
    end_distributed(state)
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
