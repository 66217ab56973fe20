#!/usr/bin/env python
"""Stage 2: generate the golden-noise sequence dataset x_T, x'_1 ... x'_n for every prompt.

    python src/generate_npd_series.py --prompt_file ./data/prompts.txt \
        --output_dir ./data/npd_sequence_dataset_sdxl/ --num_steps 10 --max_prompts 1000
    accelerate launch --num_processes 8 src/generate_npd_series.py ...   # same dataset, 8 GPUs

Rerun the same command to resume after a crash: complete samples are kept, the rest is generated.
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.diffusion import DEFAULT_MODEL_ID, TEXT_EMBEDDINGS, load_pipeline, optimize_unet
from golden_noise.golden import GoldenConfig
from golden_noise.prompts import read_prompts
from golden_noise.npd import GenerationSettings, generate_dataset
from golden_noise.cli import check_flag_minimum
from golden_noise.runtime import (DEVICE_HELP, DTYPE_CHOICES, distributed_state, end_distributed,
                                  get_logger, run_cli, setup_logging)

logger = get_logger("generate_npd_series")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--prompt_file", required=True, help="prompts: .txt (one per line) or .csv/.tsv (see --prompt_column)")
    g.add_argument("--prompt_column", default=None, help="column of a .csv/.tsv prompt file (default: prompt or caption)")
    g.add_argument("--output_dir", default="./data/npd_sequence_dataset_sdxl/", help="dataset directory to write")
    g.add_argument("--max_prompts", type=int, default=None, help="use only the first N prompts of the file")
    g.add_argument("--start_seed", type=int, default=0, help="sample seed = start_seed + prompt index")
    g.add_argument("--storage_dtype", default="float16", choices=["float16", "float32"],
                   help="dtype of the stored noise tensors")
    g.add_argument("--save_prompt_embeds", action="store_true",
                   help="also store the full prompt token embeddings (77 x D) per sample")
    g.add_argument("--text_embedding", default="auto", choices=TEXT_EMBEDDINGS,
                   help="the prompt representation stored for the RNN: pooled (text_encoder_2's projection), "
                        "mean_token (prompt_embeds averaged over the prompt's tokens) or both; auto = pooled "
                        "where the pipeline has it, else mean_token")
    g = p.add_argument_group("model")
    g.add_argument("--base_model_id", default=DEFAULT_MODEL_ID, help="diffusers pipeline: hub id or local directory")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                   help="model dtype: auto = float16 on CUDA, float32 elsewhere")
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--channels_last", action="store_true",
                   help="run the UNet in channels_last memory format (faster convolutions on recent GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet: minutes of compilation up front, then faster steps on large runs")
    g = p.add_argument_group("golden step")
    g.add_argument("--num_steps", type=int, default=10, help="n: golden steps per sequence")
    g.add_argument("--schedule_steps", type=int, default=10, help="N: DDIM schedule length (t0 = its first timestep)")
    g.add_argument("--denoise_guidance_scale", type=float, default=5.5, help="w_l: CFG scale of the denoising step")
    g.add_argument("--inversion_guidance_scale", type=float, default=1.0, help="w_w: CFG scale of the inversion step")
    g.add_argument("--batch_size", type=int, default=8, help="prompts per UNet call (2x that with CFG)")
    args = p.parse_args(argv)
    check_flag_minimum(p, args, ("num_steps", "schedule_steps", "batch_size", "max_prompts"))
    return args


def main(args: argparse.Namespace) -> dict:
    state = distributed_state()
    setup_logging(state.is_main_process)
    prompts = read_prompts(args.prompt_file, args.prompt_column)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    device = state.device if args.device == "auto" else args.device
    dtype = args.dtype if args.dtype != "auto" else ("float16" if state.device.type == "cuda" else "float32")
    pipe = load_pipeline(args.base_model_id, args.revision, args.variant, dtype, device)
    optimize_unet(pipe.unet, channels_last=args.channels_last, compile_unet=args.compile)
    settings = GenerationSettings(
        base_model_id=args.base_model_id, num_steps=args.num_steps,
        golden=GoldenConfig(args.schedule_steps, args.denoise_guidance_scale, args.inversion_guidance_scale),
        height=args.height, width=args.width, start_seed=args.start_seed, dtype=dtype,
        storage_dtype=args.storage_dtype, save_prompt_embeds=args.save_prompt_embeds,
        text_embedding=args.text_embedding, revision=args.revision,
        variant=args.variant)
    if state.is_main_process:
        logger.info("Generating golden sequences: %d prompts, n=%d, N=%d, w_l=%g, w_w=%g, batch %d, %d process(es), %s",
                    len(prompts), args.num_steps, args.schedule_steps, args.denoise_guidance_scale,
                    args.inversion_guidance_scale, args.batch_size, state.num_processes, device)
    stats = generate_dataset(pipe, prompts, args.output_dir, settings, batch_size=args.batch_size, state=state,
                             prompt_file=str(args.prompt_file), prompt_column=args.prompt_column)
    if state.is_main_process:
        rate = stats["generated"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
        per_step = stats["unet_evaluations_per_golden_step"]
        print(f"done: {stats['metadata_rows']} complete samples in {args.output_dir} "
              f"({stats['generated']} generated by process 0 of {state.num_processes}, {stats['already_complete']} "
              f"already complete) in {stats['seconds']:.1f}s, {rate:.2f} samples/s, "
              f"UNet evaluations per golden step: {per_step if per_step is None else round(per_step, 3)}")
    end_distributed(state)
    return stats


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
