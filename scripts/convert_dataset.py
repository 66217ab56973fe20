#!/usr/bin/env python
"""Convert a stage-2 dataset of loose files per sample (format 1: sequences/, metadata.csv) into the sharded format
(Parquet shards, index.json, a dataset card) that stage 2 writes today.

    python scripts/convert_dataset.py ./data/npd_sequence_dataset_sdxl ./data/npd_sequence_dataset_sdxl_sharded

OLD is only read. Every file is checked as stage 2 checks its own (checksums, pickle, shape, values); a damaged one
is an error naming it. Rerun the same command to finish a killed conversion. Training reads both formats.
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import check_flag_minimum, parser
from golden_noise.dataset.convert import convert_dataset
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("old", metavar="OLD", help="a format-1 dataset folder (the --output_dir of an older stage 2)")
    p.add_argument("new", metavar="NEW", help="the sharded dataset to write (a new folder)")
    p.add_argument("--samples_per_shard", type=int, default=None,
                   help="samples per shard, a multiple of the dataset's batch_size (default: about 1 GiB of "
                        "samples, as stage 2's default)")
    args = p.parse_args(argv)
    check_flag_minimum(p, args, ("samples_per_shard",))
    return args


def main(args: argparse.Namespace) -> dict:
    setup_logging(quiet_diffusion_libraries=False)
    stats = convert_dataset(args.old, args.new, args.samples_per_shard)
    print(f"done: {stats['samples']} samples in {stats['shards']} shard(s) in {args.new} ({stats['bytes'] / 1e6:.1f} "
          f"MB, {stats['shards']} data files; {args.old}: {stats['files_before']} files, "
          f"{stats['bytes_before'] / 1e6:.1f} MB)")
    return stats


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
