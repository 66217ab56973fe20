#!/usr/bin/env python
"""Stage 2: generate the golden-noise sequence dataset x_T, x'_1 ... x'_n for every prompt.

    python src/generate_npd_series.py --prompt_file ./data/prompts.txt \
        --output_dir ./data/npd_sequence_dataset_sdxl/ --num_steps 10 --max_prompts 1000
    accelerate launch --num_processes 8 src/generate_npd_series.py ...   # same dataset, 8 GPUs

Rerun the same command to resume after a crash: complete samples are kept, missing or damaged files are
regenerated. A rerun with other prompts or settings into the same --output_dir is refused; a larger --max_prompts
(the old prompts first) adds samples.
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import (add_dataclass_arguments, add_pipeline_arguments, check_flag_minimum,
                              dataclass_defaults, dataclass_from_args, parser)
from golden_noise.diffusion import DEFAULT_MODEL_ID, TEXT_EMBEDDINGS
from golden_noise.golden import GoldenConfig
from golden_noise.npd import GenerationJob, GenerationSettings, run_generation
from golden_noise.runtime import distributed_state, end_distributed, run_cli, setup_logging
from golden_noise.scoring import ScoringConfig

GUIDANCE_FLAGS = ("denoise_guidance_scale", "inversion_guidance_scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    g = p.add_argument_group("data")
    g.add_argument("--prompt_file", required=True, help="prompts: .txt (one per line) or .csv/.tsv (see --prompt_column)")
    g.add_argument("--prompt_column", default=None, help="column of a .csv/.tsv prompt file (default: prompt or caption)")
    g.add_argument("--output_dir", default="./data/npd_sequence_dataset_sdxl/", help="dataset directory to write")
    g.add_argument("--max_prompts", type=int, default=None,
                   help="use only the first N prompts of the file (a rerun with a larger N adds samples)")
    g.add_argument("--start_seed", type=int, default=0, help="sample seed = start_seed + prompt index")
    g.add_argument("--storage_dtype", default="float16", choices=["float16", "float32"],
                   help="dtype of the stored noise tensors")
    g.add_argument("--save_prompt_embeds", action="store_true",
                   help="also store the full prompt token embeddings (77 x D) per sample")
    g.add_argument("--text_embedding", default="auto", choices=TEXT_EMBEDDINGS,
                   help="the prompt representation stored for the RNN: pooled (SDXL: text_encoder_2's projection; "
                        "SD3: pooled_projections; FLUX: CLIP's pooled output), mean_token (the token embeddings "
                        "averaged over the prompt's own tokens; SD3: its CLIP tokens, FLUX: T5) or both; auto = "
                        "pooled where the model family has one, else mean_token (SD 1.5/2.1)")
    g = p.add_argument_group("model")
    add_pipeline_arguments(g, DEFAULT_MODEL_ID, "diffusers pipeline: hub id or local directory")
    g.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's)")
    g.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's)")
    g.add_argument("--channels_last", action="store_true",
                   help="run the denoiser in channels_last memory format (faster UNet convolutions on recent GPUs)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the denoiser (UNet or transformer): minutes of compilation up front, then "
                        "faster steps on large runs")
    g = p.add_argument_group("golden step")
    g.add_argument("--num_steps", type=int, default=10, help="n: golden steps per sequence")
    add_dataclass_arguments(g, GoldenConfig)
    g.add_argument("--batch_size", type=int, default=8,
                   help="prompts per UNet call (2x that with CFG); part of the dataset's settings: a sample's "
                        "sequence depends on its batch in the last float bits, so a rerun must keep it")
    g = p.add_argument_group("scores (NPNet's data recipe: train on samples whose golden image scores higher)")
    add_dataclass_arguments(g, ScoringConfig)
    args = p.parse_args(argv)
    check_flag_minimum(p, args, ("num_steps", "schedule_steps", "batch_size", "max_prompts",
                                 "score_num_inference_steps", "score_batch_size"))
    check_flag_minimum(p, args, (*GUIDANCE_FLAGS, "score_guidance_scale"), minimum=0)
    given = [f"--{k}" for k, v in dataclass_defaults(ScoringConfig).items() if getattr(args, k) != v]
    if given and not args.score_metric:
        p.error(f"{' '.join(given)} set(s) how samples are scored: add --score_metric METRIC")
    return args


def main(args: argparse.Namespace) -> dict:
    state = distributed_state()
    setup_logging(state.is_main_process)
    settings = GenerationSettings(
        base_model_id=args.base_model_id, num_steps=args.num_steps, golden=dataclass_from_args(GoldenConfig, args),
        height=args.height, width=args.width, start_seed=args.start_seed, dtype=args.dtype,
        storage_dtype=args.storage_dtype, save_prompt_embeds=args.save_prompt_embeds,
        text_embedding=args.text_embedding, revision=args.revision, variant=args.variant,
        scoring=dataclass_from_args(ScoringConfig, args) if args.score_metric else None)
    job = GenerationJob(
        prompt_file=args.prompt_file, output_dir=args.output_dir, settings=settings, prompt_column=args.prompt_column,
        max_prompts=args.max_prompts, batch_size=args.batch_size, device=args.device,
        enable_model_cpu_offload=args.enable_model_cpu_offload, enable_vae_slicing=args.enable_vae_slicing,
        enable_vae_tiling=args.enable_vae_tiling, channels_last=args.channels_last, compile=args.compile)
    stats = run_generation(job, state)
    if state.is_main_process:
        rate = stats["generated"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
        per_step = stats["unet_evaluations_per_golden_step"]
        print(f"done: {stats['metadata_rows']} complete samples in {args.output_dir} "
              f"({stats['generated']} generated by process 0 of {state.num_processes}, {stats['already_complete']} "
              f"already complete, {stats['damaged_files']} damaged files regenerated) in {stats['seconds']:.1f}s, "
              f"{rate:.2f} samples/s, {'UNet' if stats['denoiser'] == 'unet' else stats['denoiser']} evaluations per "
              "golden step: "
              f"{per_step if per_step is None else round(per_step, 3)}")
    end_distributed(state)
    return stats


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
