"""Stage 1: extract unique prompts from a dataset (e.g. Pick-a-Pic) into a prompt file, one prompt per line.

    python scripts/extract_prompts.py --dataset_name yuvalkirstain/pickapic_v1 --split train --streaming \
        --max_prompts 10000 --seed 0 --test_size 500 --output_dir ./data --output_filename prompts.txt
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.prompts_extract import extract_prompts
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset_name", required=True,
                   help="a hub dataset id (e.g. yuvalkirstain/pickapic_v1), or local data: a directory, or a "
                        ".parquet, .csv, .tsv, .json, .jsonl or .txt file (a .txt file is one prompt per line)")
    p.add_argument("--dataset_config", default=None, help="the hub dataset's config (subset) name, if it has several")
    p.add_argument("--split", default="train",
                   help="dataset split to read (a single local file is read as this split)")
    p.add_argument("--prompt_column", default="caption",
                   help="column holding the prompts; a text dataset without it uses its 'text' column")
    p.add_argument("--revision", default=None, help="hub dataset revision (branch, tag or commit); hub ids only")
    p.add_argument("--streaming", action="store_true",
                   help="stream the rows instead of downloading the dataset first; only the prompt column is "
                        "read, so Pick-a-Pic's image bytes are never downloaded")
    p.add_argument("--output_dir", default="data", help="directory for the prompt files")
    p.add_argument("--output_filename", default="prompts.txt", help="main prompt file name inside --output_dir")
    p.add_argument("--max_prompts", type=int, default=None,
                   help="stop once the main file has this many unique prompts (None: read the whole split)")
    p.add_argument("--seed", type=int, default=None,
                   help="shuffle the rows with this seed before taking prompts (None: keep the dataset order); "
                        "with --streaming, shuffles shards and a buffer of --shuffle_buffer_size rows")
    p.add_argument("--shuffle_buffer_size", type=int, default=10_000,
                   help="rows in the shuffle buffer with --streaming and --seed")
    p.add_argument("--test_size", type=int, default=None,
                   help="also write this many prompts (the first unique ones after shuffling) to --test_filename; "
                        "they are left out of the main file")
    p.add_argument("--test_filename", default="test_prompts.txt",
                   help="held-out prompt file name inside --output_dir (written only with --test_size)")
    p.add_argument("--cache_dir", default=None, help="datasets cache directory (None: HF_DATASETS_CACHE)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    setup_logging(quiet_diffusion_libraries=False)  # no model is loaded here: skip importing diffusers
    extract_prompts(args.dataset_name, args.output_dir, args.output_filename, split=args.split,
                    prompt_column=args.prompt_column, dataset_config=args.dataset_config, revision=args.revision,
                    streaming=args.streaming, max_prompts=args.max_prompts, seed=args.seed,
                    shuffle_buffer_size=args.shuffle_buffer_size, test_size=args.test_size,
                    test_filename=args.test_filename, cache_dir=args.cache_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
