"""Stage 1: extract unique prompts from a dataset (e.g. Pick-a-Pic) into a prompt file, one prompt per line.

    python scripts/extract_prompts.py --dataset_name yuvalkirstain/pickapic_v1 --split train --streaming \
        --max_prompts 10000 --seed 0 --test_size 500 --output_dir ./data --output_filename prompts.txt
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import add_dataclass_arguments, dataclass_from_args, parser
from golden_noise.prompts_extract import DATASET_HELP, PromptSource, extract_prompts
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--dataset_name", required=True, help=DATASET_HELP)
    add_dataclass_arguments(p, PromptSource, exclude=("dataset_name",))
    p.add_argument("--output_dir", default="data", help="directory for the prompt files")
    p.add_argument("--output_filename", default="prompts.txt", help="main prompt file name inside --output_dir")
    p.add_argument("--max_prompts", type=int, default=None,
                   help="stop once the main file has this many unique prompts (None: read the whole split)")
    p.add_argument("--test_size", type=int, default=None,
                   help="also write this many prompts (the first unique ones after shuffling) to --test_filename; "
                        "they are left out of the main file")
    p.add_argument("--test_filename", default="test_prompts.txt",
                   help="held-out prompt file name inside --output_dir (written only with --test_size)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    setup_logging(quiet_diffusion_libraries=False)  # no model is loaded here: skip importing diffusers
    extract_prompts(dataclass_from_args(PromptSource, args), args.output_dir, args.output_filename,
                    max_prompts=args.max_prompts, test_size=args.test_size, test_filename=args.test_filename)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
