#!/usr/bin/env python
"""The quickstart's closing table: standard vs gnsnet vs oracle (mean reward, gain with 95% CI, win rate,
share of the oracle's gain, cost of the noise), the RNN's validation, an image grid and the report's path."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from golden_noise.cli import parser
from golden_noise.io import atomic_write_json
from golden_noise.methods import folder
from golden_noise.prompts import read_prompts
from golden_noise_toy.quickstart import image_grid, summary_table
from golden_noise.runtime import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--results_dir", required=True, help="evaluate_hps.py's --results_dir")
    p.add_argument("--run_dir", required=True, help="the training run (its validation.json)")
    p.add_argument("--images_dir", required=True, help="batch_inference.py's --output_base_dir")
    p.add_argument("--prompt_file", default=None, help="prompts of the images (for the grid's caption list)")
    p.add_argument("--metric", default="toy_attributes", help="metric of the table")
    p.add_argument("--grid_columns", type=int, default=8, help="prompts shown in the image grid")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    table, facts = summary_table(args.results_dir, args.run_dir, args.images_dir, args.metric)
    results = Path(args.results_dir)
    indices = sorted(int(p.stem) for p in (Path(args.images_dir) / folder("gnsnet")).glob("*.png"))[: args.grid_columns]
    grid = image_grid(args.images_dir, indices, results / "grid.png")
    if args.prompt_file:
        texts = {p.index: p.text for p in read_prompts(args.prompt_file)}
        facts["grid_prompts"] = [texts[i] for i in indices]
    atomic_write_json(results / "quickstart.json", facts)
    print()
    print(table)
    print(f"image grid (rows: standard, gnsnet, oracle): {grid}")
    print(f"HTML report: {results / 'report.html'}")


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
