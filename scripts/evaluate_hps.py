"""Stage 6: score the images of each method (standard / gnsnet / oracle) with reward models and compare them.

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

from golden_noise.cli import add_list_argument, check_flag_minimum, parser
from golden_noise.errors import UserError
from golden_noise.evaluation import EvaluationJob, build_metrics, run_evaluation
from golden_noise.methods import METHOD_HELP, is_method, method_of_folder
from golden_noise.report import format_table
from golden_noise.rewards.base import PLUGIN_HELP, available_rewards, is_reward_name
from golden_noise.rewards.hpsv2 import ARCHITECTURE, CHECKPOINTS
from golden_noise.runtime import DEVICE_HELP, DTYPE_CHOICES, resolve_device, run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--prompt_file", required=True, help="the prompt file batch inference used (.txt one per line, "
                   "or .csv/.tsv); image {index}.png belongs to the prompt on 0-based line/row index")
    p.add_argument("--prompt_column", default=None, help="column of a .csv/.tsv prompt file (default: the first "
                   "of prompt, caption, text)")
    p.add_argument("--image_base_dir", default="./inference_output/", help="folder holding the *_output method "
                   "folders (and manifest.csv) written by batch inference")
    p.add_argument("--results_dir", default="./results/", help="where the CSV, summary.json, plots and "
                   "report.html go (created; existing files of the same names are replaced)")
    add_list_argument(p, "--methods", default=None, metavar="METHOD",
                      valid=lambda m: is_method(method_of_folder(m) or m), valid_help=METHOD_HELP,
                      help=f"methods to compare ({METHOD_HELP}; folder {{name}}_output or {{name}}), e.g. "
                      "--methods standard gnsnet (default: every *_output folder that holds images)")
    p.add_argument("--baseline", default="standard", help="the method every other method is compared with")
    metric_help = f"choose from {', '.join(available_rewards())} or {PLUGIN_HELP}"
    add_list_argument(p, "--metrics", default=["hpsv2"], metavar="METRIC", valid=is_reward_name,
                      valid_help=metric_help, help=f"reward models, e.g. --metrics hpsv2 pickscore: {metric_help}")
    p.add_argument("--hps_version", default="v2.1", choices=sorted(CHECKPOINTS), help="HPSv2 checkpoint version")
    p.add_argument("--hps_checkpoint", default=None, help="local HPS_v2*.pt checkpoint (same as --reward_path "
                   "hpsv2=PATH; default: download the --hps_version's from the hub repo xswu/HPSv2)")
    p.add_argument("--hps_model", default=ARCHITECTURE, help="open_clip architecture of the HPS checkpoint: a "
                   "model name or a path to an open_clip model-config .json")
    p.add_argument("--reward_path", action="append", default=None, metavar="METRIC=PATH",
                   help="local model file/folder (or hub id) for a metric, e.g. pickscore=/models/PickScore_v1 "
                   "or toy_attributes=PATH; repeatable")
    p.add_argument("--batch_size", type=int, default=8, help="images per scorer forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto"] + DTYPE_CHOICES,
                   help="scorer compute dtype: auto = float16 (autocast) on CUDA, float32 elsewhere")
    p.add_argument("--bootstrap_samples", type=int, default=10000, help="bootstrap resamples for the 95%% CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--no_progress", action="store_true", help="no progress bar while scoring")
    args = p.parse_args(argv)
    check_flag_minimum(p, args, ["batch_size", "bootstrap_samples"])
    return args


def job_from_args(args: argparse.Namespace) -> EvaluationJob:
    """The evaluation job the flags describe (flag errors are UserErrors)."""
    device = resolve_device(args.device)
    metrics = build_metrics(args.metrics, args.reward_path, device, None if args.dtype == "auto" else args.dtype,
                            args.batch_size)
    for metric in metrics:
        if metric.reward == "hpsv2":  # --hps_checkpoint means --reward_path hpsv2=...
            if args.hps_checkpoint:
                if metric.options["path"] not in (None, args.hps_checkpoint):
                    raise UserError("--hps_checkpoint and --reward_path hpsv2=... disagree: pass only one")
                metric.options["path"] = args.hps_checkpoint
            metric.options.update(version=args.hps_version, architecture=args.hps_model)
    settings = {"hps_version": args.hps_version if "hpsv2" in args.metrics else None, "device": str(device),
                "dtype": args.dtype, "batch_size": args.batch_size}
    return EvaluationJob(prompt_file=args.prompt_file, image_base_dir=args.image_base_dir,
                         results_dir=args.results_dir, metrics=metrics, methods=args.methods, baseline=args.baseline,
                         prompt_column=args.prompt_column, bootstrap_samples=args.bootstrap_samples, seed=args.seed,
                         progress=not args.no_progress, settings=settings)


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
