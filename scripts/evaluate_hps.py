"""Stage 6: score the images of each method (standard, gnsnet, direct, npnet, oracle, best_of_K) with reward models
and compare them.

    python scripts/evaluate_hps.py --prompt_file ./data/test_prompts.txt --image_base_dir ./inference_output/ \
        --results_dir ./results/ --hps_version v2.1

Images are `{image_base_dir}/{method}_output/{index}.png`, index = the prompt's 0-based line in the prompt file;
batch inference's `manifest.csv` beside them must record the same prompts. Writes to --results_dir:
`{metrics}_evaluation.csv` (`hpsv2_evaluation.csv` by default: index, prompt, `{metric}_{method}` scores and
`{metric}_diff_{method}` = method - baseline), `summary.json`, plots (`{metric}_scatter_{method}.png`,
`{metric}_diff_hist_{method}.png`) and `report.html` (open it in a browser). `--metrics FILE.py:NAME` scores with
your own reward: a class or factory NAME in that file, built with the keyword options it accepts (path, device,
dtype, batch_size) and with `score(images: list[PIL.Image], prompts: list[str]) -> list[float]`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from golden_noise.cli import add_dataclass_arguments, dataclass_from_args, parser
from golden_noise.evaluation import EvaluationJob, RewardConfig, run_evaluation
from golden_noise.report import format_table
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_dataclass_arguments(p, EvaluationJob, exclude=("rewards", "bootstrap_samples", "seed", "no_progress"))
    add_dataclass_arguments(p, RewardConfig)
    add_dataclass_arguments(p, EvaluationJob, include=("bootstrap_samples", "seed", "no_progress"))
    return p.parse_args(argv)  # the flags' ranges and choices are their fields' (EvaluationJob, RewardConfig)


def job_from_args(args: argparse.Namespace) -> EvaluationJob:
    """The evaluation job the flags describe."""
    return dataclass_from_args(EvaluationJob, args, rewards=dataclass_from_args(RewardConfig, args))


def main(args: argparse.Namespace) -> dict:
    setup_logging()
    summary = run_evaluation(job_from_args(args))
    out, device = Path(args.results_dir), summary["settings"]["device"]
    print(format_table(summary["results"], summary["baseline"]))
    for metric, s in summary["throughput"].items():
        print(f"{metric}: {s['images']} images in {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s on {device})")
    files = summary["files"]
    print(f"wrote {out / files['csv']}, {out / 'summary.json'}, {len(files['plots'])} plots and {out / files['html']}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
