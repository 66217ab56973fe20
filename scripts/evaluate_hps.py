"""Stage 6: score the images of each method (standard / gnsnet / oracle) with reward models and compare them.

    python scripts/evaluate_hps.py --prompt_file ./data/test_prompts.txt --image_base_dir ./inference_output/ \
        --results_dir ./results/ --hps_version v2.1

Images are `{image_base_dir}/{method}_output/{index}.png`, index = the prompt's 0-based line in the prompt file.
Writes to --results_dir: `{metrics}_evaluation.csv` (`hpsv2_evaluation.csv` by default: index, prompt,
`{metric}_{method}` scores and `{metric}_diff_{method}` = method - baseline), `summary.json`, plots
(`{metric}_scatter_{method}.png`, `{metric}_diff_hist_{method}.png`) and `report.html` (open it in a browser).
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from golden_noise.evaluation import (check_readable, collect_images, find_methods, index_ranges, pair_images,
                                     prompt_map, score_all, summarize)
from golden_noise.errors import UserError
from golden_noise.io import atomic_write_json
from golden_noise.prompts import read_prompts
from golden_noise.report import NOTES, csv_name, format_table, write_html, write_plots, write_scores_csv
from golden_noise.rewards.base import available_rewards
from golden_noise.rewards.hpsv2 import ARCHITECTURE, CHECKPOINTS
from golden_noise.runtime import DEVICE_HELP, DTYPE_CHOICES, get_logger, resolve_device, run_cli, setup_logging

log = get_logger("evaluate")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt_file", required=True, help="the prompt file batch inference used (.txt one per line, "
                   "or .csv/.tsv); image {index}.png belongs to the prompt on 0-based line/row index")
    p.add_argument("--prompt_column", default=None, help="column of a .csv/.tsv prompt file; None = the first of "
                   "prompt, caption, text")
    p.add_argument("--image_base_dir", default="./inference_output/", help="folder holding the *_output method "
                   "folders written by batch inference")
    p.add_argument("--results_dir", default="./results/", help="where the CSV, summary.json, plots and "
                   "report.html go (created; existing files of the same names are replaced)")
    p.add_argument("--methods", default=None, help="comma-separated methods to compare, e.g. standard,gnsnet "
                   "(folder {name}_output or {name}); None = every *_output folder that holds images")
    p.add_argument("--baseline", default="standard", help="the method every other method is compared with")
    p.add_argument("--metrics", default="hpsv2", help="comma-separated reward models; available: "
                   + ", ".join(available_rewards()))
    p.add_argument("--hps_version", default="v2.1", choices=sorted(CHECKPOINTS), help="HPSv2 checkpoint version")
    p.add_argument("--hps_checkpoint", default=None, help="local HPS_v2*.pt checkpoint; None = download the "
                   "--hps_version's from the hub repo xswu/HPSv2 (same as --reward_path hpsv2=PATH)")
    p.add_argument("--hps_model", default=ARCHITECTURE, help="open_clip architecture of the HPS checkpoint: a "
                   "model name or a path to an open_clip model-config .json")
    p.add_argument("--reward_path", action="append", default=[], metavar="METRIC=PATH",
                   help="local model file/folder (or hub id) for a metric, e.g. pickscore=/models/PickScore_v1 "
                   "or toy_attributes=PATH; repeatable")
    p.add_argument("--batch_size", type=int, default=8, help="images per scorer forward pass")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--dtype", default="auto", choices=["auto"] + DTYPE_CHOICES,
                   help="scorer compute dtype: auto = float16 (autocast) on CUDA, float32 elsewhere")
    p.add_argument("--bootstrap_samples", type=int, default=10000, help="bootstrap resamples for the 95%% CI")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p.parse_args(argv)


def _metric_options(args, metrics: list[str], device) -> dict[str, dict]:
    """The keyword options each reward factory gets: path, device, dtype, batch_size (+ hpsv2's own)."""
    paths: dict[str, str] = {}
    for item in args.reward_path:
        metric, sep, path = item.partition("=")
        if not sep or not metric or not path:
            raise UserError(f"--reward_path {item!r}: write METRIC=PATH, e.g. pickscore=/models/PickScore_v1")
        if metric not in metrics:
            raise UserError(f"--reward_path {item!r} names {metric!r}, which is not in --metrics {','.join(metrics)}")
        paths[metric] = path
    if args.hps_checkpoint:
        if "hpsv2" in paths and paths["hpsv2"] != args.hps_checkpoint:
            raise UserError("--hps_checkpoint and --reward_path hpsv2=... disagree: pass only one")
        paths["hpsv2"] = args.hps_checkpoint
    dtype = None if args.dtype == "auto" else args.dtype
    options = {}
    for metric in metrics:
        options[metric] = {"path": paths.get(metric), "device": device, "dtype": dtype, "batch_size": args.batch_size}
        if metric == "hpsv2":
            options[metric].update(version=args.hps_version, architecture=args.hps_model)
    return options


def main(args: argparse.Namespace) -> dict:
    setup_logging()
    if args.batch_size < 1 or args.bootstrap_samples < 1:
        raise UserError("--batch_size and --bootstrap_samples must be at least 1")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    names = available_rewards()
    unknown = [m for m in metrics if m not in names]
    if not metrics or unknown or len(set(metrics)) != len(metrics):
        raise UserError(f"--metrics {args.metrics!r}: choose distinct metrics from {', '.join(names)}")
    device = resolve_device(args.device)
    options = _metric_options(args, metrics, device)

    prompts = prompt_map(read_prompts(args.prompt_file, args.prompt_column))
    wanted = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    methods = [collect_images(m, prompts, args.prompt_file) for m in find_methods(args.image_base_dir, wanted,
                                                                                  args.baseline)]
    if wanted is None:
        for m in [m for m in methods if not m.files and m.name != args.baseline]:
            log.warning("skipping %s: no {index}.png images in it", m.folder)
        methods = [m for m in methods if m.files or m.name == args.baseline]
    indices, missing = pair_images(methods, prompts)
    missing_text = {m: index_ranges(v) for m, v in missing.items()}
    for name, text in missing_text.items():
        if text:
            log.warning("%s lacks %d of %d images (indices %s): evaluating the %d prompts every method has",
                        name, len(missing[name]), len(prompts), text, len(indices))
    check_readable([m.files[i] for m in methods for i in indices])
    log.info("evaluating %d prompts x %d methods (%s) with %s on %s", len(indices), len(methods),
             ", ".join(m.name for m in methods), ", ".join(metrics), device)

    scores, speed = score_all(metrics, methods, indices, prompts, options)
    results = summarize(scores, args.baseline, args.bootstrap_samples, args.seed)

    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / csv_name(metrics)
    write_scores_csv(csv_path, indices, prompts, scores, args.baseline)
    plots = write_plots(out, scores, args.baseline)
    html_path = out / "report.html"
    files = {m.name: m.files for m in methods}
    write_html(html_path, indices=indices, prompts=prompts, files=files, scores=scores, results=results,
               baseline=args.baseline, plots=plots, missing=missing_text,
               title=f"Golden noise evaluation: {', '.join(m.name for m in methods)} ({', '.join(metrics)})",
               subtitle=f"{len(indices)} of {len(prompts)} prompts from {args.prompt_file}; images from "
                        f"{args.image_base_dir}; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}")
    summary = {
        "baseline": args.baseline, "methods": [m.name for m in methods], "metrics": metrics,
        "prompt_file": str(args.prompt_file), "image_base_dir": str(args.image_base_dir),
        "n_prompts": len(prompts), "n_evaluated": len(indices),
        "missing": missing, "results": results, "throughput": speed, "notes": NOTES,
        "settings": {"hps_version": args.hps_version if "hpsv2" in metrics else None,
                     "reward_paths": {k: v["path"] for k, v in options.items()}, "device": str(device),
                     "dtype": args.dtype, "batch_size": args.batch_size,
                     "bootstrap_samples": args.bootstrap_samples, "seed": args.seed},
        "files": {"csv": csv_path.name, "html": html_path.name, "plots": [p.name for p in plots]},
    }
    atomic_write_json(out / "summary.json", summary)
    print(format_table(results, args.baseline))
    for metric, s in speed.items():
        print(f"{metric}: {s['images']} images in {s['seconds']:.1f} s ({s['images_per_s']:.2f} images/s on {device})")
    print(f"wrote {csv_path}, {out / 'summary.json'}, {len(plots)} plots and {html_path}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
