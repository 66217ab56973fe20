"""Stage 4: one prompt, one seed -> the image from the RNN's golden noise (and optionally the standard and
oracle images from the same seed), the noises and a JSON of every setting.

    python src/inference_rnn.py --rnn_weights_path output/rnn_v3_seq_model_output/rnn_v3_model_final \
        --prompt "A futuristic cityscape at sunset, synthwave style" --seed 12345 --generate_standard
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.diffusion import DEFAULT_MODEL_ID, SCHEDULERS
from golden_noise.runtime import DEVICE_HELP, DTYPE_CHOICES, run_cli


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rnn_weights_path", required=True,
                   help="the trained RNN export: its .safetensors, its .json, their stem, or the training run "
                        "directory holding rnn_v3_model_final.*")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--output_dir", default="./inference_output", help="folder for the images, noises and settings")
    p.add_argument("--output_name", default=None,
                   help="file-name stem of the outputs (default: a slug of the prompt plus the seed)")
    p.add_argument("--base_model_id", default=None,
                   help=f"diffusers pipeline (hub id or local dir); default: the one the RNN was trained with, "
                        f"else {DEFAULT_MODEL_ID}")
    p.add_argument("--revision", default=None, help="hub revision of --base_model_id")
    p.add_argument("--variant", default=None, help="weights variant of --base_model_id, e.g. fp16")
    p.add_argument("--num_gen_steps", type=int, default=None,
                   help="RNN rollout length n (default: num_steps of the training data; another value warns)")
    p.add_argument("--num_inference_steps", type=int, default=30, help="sampling steps of the pipeline")
    p.add_argument("--guidance_scale", type=float, default=5.5, help="classifier-free guidance of the sampling")
    p.add_argument("--negative_prompt", default=None, help="negative prompt of the sampling")
    p.add_argument("--scheduler", default="default", choices=SCHEDULERS,
                   help="sampling scheduler: the pipeline's own ('default'), DDIM, DPM-Solver++ or Euler")
    p.add_argument("--seed", type=int, default=42, help="seed of the initial noise x_T")
    p.add_argument("--height", type=int, default=None,
                   help="image height in px (default: the RNN's training resolution); must give its latent size")
    p.add_argument("--width", type=int, default=None, help="image width in px (default: as --height)")
    p.add_argument("--generate_standard", action="store_true",
                   help="also sample the standard image from x_T itself, same seed and settings")
    p.add_argument("--generate_oracle", action="store_true",
                   help="also sample from the oracle: the real golden step applied n times to x_T "
                        "(its parameters come from the RNN's training data)")
    p.add_argument("--sample_noise", action="store_true",
                   help="draw from the RNN's predicted Gaussian (seeded by --seed) instead of taking its mean; "
                        "needs an export trained with predict_variance")
    p.add_argument("--save_noise", action="store_true",
                   help="save x_T and the golden noise as .pt tensors (C, H, W)")
    p.add_argument("--dtype", default="float32", choices=DTYPE_CHOICES, help="pipeline dtype (the RNN runs in float32)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    from golden_noise.runtime import setup_logging

    setup_logging()
    from golden_noise.inference.single import run_single

    return run_single(**vars(args))


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
