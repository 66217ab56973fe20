"""Write a test prompt file disjoint from the training prompts: unique prompts of a dataset (hub id or local data,
e.g. a larger prompt file the training file was cut from), leaving out every prompt of --prompt_file.

    python scripts/generate_test_prompts.py --prompt_file data/prompts.txt --output data/test_prompts.txt \
        --num_prompts 500                                   # Pick-a-Pic's test_unique split, minus training prompts
    python scripts/generate_test_prompts.py --prompt_file data/prompts.txt --output data/test_prompts.txt \
        --dataset_name data/all_prompts.txt --seed 0        # held-out lines of an existing prompt file

Prompts are compared after whitespace normalisation, as every stage reads them; the output is deterministic for a
given --seed (none: the dataset's order).
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import add_dataclass_arguments, dataclass_from_args, parser
from golden_noise.prompts_extract import PromptSource, write_held_out_prompts
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--prompt_file", required=True,
                   help="the training prompt file: none of its prompts is written to --output")
    p.add_argument("--output", default="data/test_prompts.txt", help="the test prompt file to write")
    p.add_argument("--num_prompts", type=int, default=500, help="test prompts to write (fewer if the data runs out)")
    add_dataclass_arguments(p, PromptSource, defaults={"split": "test_unique"})
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    setup_logging(quiet_diffusion_libraries=False)  # no model is loaded here: skip importing diffusers
    write_held_out_prompts(dataclass_from_args(PromptSource, args), args.prompt_file, args.output, args.num_prompts)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
