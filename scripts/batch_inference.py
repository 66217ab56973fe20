#!/usr/bin/env python
"""Stage 5: images for every prompt of a file, from the standard noise, the RNN's golden noise (gnsnet) and/or
the oracle (the real golden step applied n times), into {output_base_dir}/{method}_output/{index}.png.

    python scripts/batch_inference.py --prompt_file ./data/test_prompts.txt --output_base_dir ./inference_output/ \
        --rnn_weights_path ./output/rnn_v3_seq_model_output/rnn_v3_model_final --start_seed 1000
    accelerate launch --num_processes 8 scripts/batch_inference.py ...   # same files, 8 GPUs

index = the prompt's 0-based line number, seed = --start_seed + index. Rerun the same command to resume:
existing images are kept (a batch with some missing is recomputed whole, so with the same --batch_size the
results depend neither on where a run stopped nor on the process count). With an RNN export the oracle's
golden-step parameters come from its training data; a golden-step flag that contradicts them warns and wins.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from golden_noise.diffusion import DEFAULT_MODEL_ID, SCHEDULERS
from golden_noise.cli import check_flag_minimum
from golden_noise.runtime import DEVICE_HELP, DTYPE_CHOICES, run_cli

METHODS = ("standard", "gnsnet", "oracle")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--prompt_file", required=True,
                   help="prompts: .txt (one per line) or .csv/.tsv (see --prompt_column)")
    g.add_argument("--prompt_column", default=None,
                   help="column of a .csv/.tsv prompt file (default: prompt or caption)")
    g.add_argument("--output_base_dir", default="./inference_output", help="folder of the {method}_output/ folders")
    g.add_argument("--methods", nargs="+", default=["standard", "gnsnet"], choices=METHODS,
                   help="which noises to sample from: standard (x_T), gnsnet (the RNN's) and/or oracle")
    g.add_argument("--start_seed", type=int, default=0, help="seed of prompt index i = start_seed + i")
    g.add_argument("--batch_size", type=int, default=4, help="prompts per pipeline call")
    g.add_argument("--save_noise", action="store_true",
                   help="also save each method's initial latents as noise/{method}/{index}.pt (C, H, W)")
    g = p.add_argument_group("models")
    g.add_argument("--rnn_weights_path", default=None,
                   help="trained RNN export (needed for gnsnet): .safetensors, .json, their stem or the run dir")
    g.add_argument("--base_model_id", default=None,
                   help=f"diffusers pipeline (hub id or local dir); default: the RNN's, else {DEFAULT_MODEL_ID}")
    g.add_argument("--revision", default=None, help="hub revision of --base_model_id")
    g.add_argument("--variant", default=None, help="weights variant of --base_model_id, e.g. fp16")
    g.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="pipeline dtype (the RNN runs in float32)")
    g.add_argument("--device", default="auto", help=DEVICE_HELP + "; under accelerate launch, auto = this process's")
    g = p.add_argument_group("sampling")
    g.add_argument("--num_inference_steps", type=int, default=30, help="sampling steps of the pipeline")
    g.add_argument("--guidance_scale", type=float, default=5.5, help="classifier-free guidance of the sampling")
    g.add_argument("--negative_prompt", default=None, help="negative prompt of the sampling")
    g.add_argument("--scheduler", default="default", choices=SCHEDULERS,
                   help="sampling scheduler: the pipeline's own ('default'), DDIM, DPM-Solver++ or Euler")
    g.add_argument("--height", type=int, default=None, help="image height in px (default: the RNN's, else the model's)")
    g.add_argument("--width", type=int, default=None, help="image width in px (default: the RNN's, else the model's)")
    g = p.add_argument_group("golden noise")
    g.add_argument("--num_gen_steps", type=int, default=None,
                   help="n: RNN rollout / oracle steps (default: num_steps of the RNN's training data, else 10)")
    g.add_argument("--schedule_steps", type=int, default=None,
                   help="oracle: DDIM schedule length N (default: the RNN's training data, else 10)")
    g.add_argument("--denoise_guidance_scale", type=float, default=None,
                   help="oracle: CFG of the denoising step w_l (default: the RNN's training data, else 5.5)")
    g.add_argument("--inversion_guidance_scale", type=float, default=None,
                   help="oracle: CFG of the inversion step w_w (default: the RNN's training data, else 1.0)")
    args = p.parse_args(argv)
    check_flag_minimum(p, args, ("batch_size", "num_inference_steps", "num_gen_steps", "schedule_steps"))
    return args


def main(args: argparse.Namespace) -> dict | None:
    from golden_noise.diffusion import load_pipeline, set_scheduler
    from golden_noise.inference import GoldenNoise
    from golden_noise.inference.batch import BatchJob, run_batch
    from golden_noise.errors import UserError
    from golden_noise.prompts import read_prompts
    from golden_noise.runtime import distributed_state, end_distributed, get_logger, setup_logging

    state = distributed_state()
    setup_logging(state.is_main_process)
    logger = get_logger("batch_inference")
    methods = list(dict.fromkeys(args.methods))
    prompts = read_prompts(args.prompt_file, args.prompt_column)  # fail fast, before loading any model
    device = state.device if args.device == "auto" else args.device
    gn = None
    if args.rnn_weights_path:
        gn = GoldenNoise.from_pretrained(args.rnn_weights_path, device=device)
    elif "gnsnet" in methods:
        raise UserError("--methods gnsnet needs --rnn_weights_path (a trained RNN export); "
                        "or choose --methods standard oracle")
    model_id = args.base_model_id or (gn.run_config.get("base_model_id") if gn else None) or DEFAULT_MODEL_ID
    pipe = load_pipeline(model_id, args.revision, args.variant, args.dtype, device)
    set_scheduler(pipe, args.scheduler)
    job = BatchJob(
        prompt_file=args.prompt_file, output_base_dir=args.output_base_dir, methods=methods,
        start_seed=args.start_seed, batch_size=args.batch_size, num_gen_steps=args.num_gen_steps,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt, height=args.height, width=args.width, save_noise=args.save_noise,
        prompt_column=args.prompt_column,
        golden_overrides={"schedule_steps": args.schedule_steps, "denoise_guidance_scale": args.denoise_guidance_scale,
                          "inversion_guidance_scale": args.inversion_guidance_scale},
        settings={**vars(args), "base_model_id_used": model_id,
                  "rnn_weights_path": str(Path(args.rnn_weights_path).resolve()) if args.rnn_weights_path else None})
    if state.is_main_process:
        logger.info("Running batch inference: methods %s, batch %d, %d process(es), %s, model %s",
                    " ".join(methods), args.batch_size, state.num_processes, device, model_id)
    summary = run_batch(job, pipe, gn, state, prompts)
    if summary is not None:
        for method, s in summary["methods"].items():
            noise, sampling = s["mean_noise_seconds_per_image"], s["mean_sampling_seconds_per_image"]
            timing = "" if sampling is None else f"; mean per image: noise {noise:.4f}s, sampling {sampling:.4f}s"
            if s["noise_over_sampling"] is not None and method != "standard":
                timing += f" (noise = {100 * s['noise_over_sampling']:.1f}% of sampling)"
            logger.info("%s: %d images (%d new, %d already there)%s", method, s["images"], s["generated_this_run"],
                        s["skipped_existing"], timing)
        out = Path(args.output_base_dir)
        logger.info("manifest %s, summary %s (%d process(es))", out / "manifest.csv", out / "summary.json",
                    summary["num_processes"])
    end_distributed(state)
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
