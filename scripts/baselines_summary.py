#!/usr/bin/env python
"""The README's "Does the sequence matter?" tables (markdown) from scripts/baselines_toy.sh's sweeps and training runs:
learned noises vs the oracle, gnsnet per rollout length, every golden-noise cell vs standard noise at matched
compute, the models' parameters, FLOPs and held-out explained fractions, and the data-efficiency curve."""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import parser
from golden_noise.runtime import run_cli
from golden_noise_toy.baselines import summary


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--results_dir", default="results/baselines", help="folder of sweep/ and data_f{fraction}/")
    p.add_argument("--runs_dir", default="output/baselines",
                   help="folder of the {rnn_v3,direct,npnet}_f{fraction} runs")
    p.add_argument("--fractions", nargs="+", default=["1.0", "0.3", "0.1"],
                   help="training fractions, as in the folder names")
    p.add_argument("--num_steps", type=int, default=2,
                   help="n of the training sequences (baselines_toy.sh's NUM_STEPS)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    text = summary(args.results_dir, args.runs_dir, args.fractions, args.num_steps)
    print(text)
    return text


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
