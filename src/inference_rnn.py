"""Stage 4: one prompt, one seed -> the image from the RNN's golden noise (and optionally the standard and
oracle images from the same seed), the noises and a JSON of every setting.

    python src/inference_rnn.py --rnn_weights_path output/rnn_v3_seq_model_output/rnn_v3_model_final \
        --prompt "A futuristic cityscape at sunset, synthwave style" --seed 12345 --generate_standard
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import add_dataclass_arguments, add_pipeline_arguments, dataclass_from_args
from golden_noise.cli import parser as make_parser
from golden_noise.diffusion import DEFAULT_MODEL_ID
from golden_noise.inference.config import PipelineSpec, add_sampling_arguments, sampling_from_args
from golden_noise.inference.single import SingleJob, run_single
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("--rnn_weights_path", required=True,
                   help="the trained RNN export: its .safetensors, its .json, their stem, the training run directory "
                        "holding rnn_v3_model_final.*, the seed's rnn_v3_model_final.pth (= that export), or a hub "
                        "repo id owner/name (or a folder) holding model.safetensors + config.json")
    p.add_argument("--prompt", required=True, help="the text prompt")
    add_dataclass_arguments(p, SingleJob, exclude=("rnn_weights_path", "prompt", "sampling", "pipeline"))
    add_sampling_arguments(p.add_argument_group("sampling"))
    add_pipeline_arguments(p.add_argument_group("pipeline"), None,
                           f"diffusers pipeline (hub id or local dir); default: the one the RNN was trained with, "
                           f"else {DEFAULT_MODEL_ID}")
    return p.parse_args(argv)  # the flags' ranges are their fields' (SingleJob, SamplingConfig)


def job_from_args(args: argparse.Namespace) -> SingleJob:
    """The stage-4 job the flags describe."""
    return dataclass_from_args(SingleJob, args, sampling=sampling_from_args(args),
                               pipeline=dataclass_from_args(PipelineSpec, args))


def main(args: argparse.Namespace) -> dict:
    setup_logging()
    return run_single(job_from_args(args))


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
