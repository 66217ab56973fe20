"""Measure whether golden noise helps in a toy world: for held-out (prompt, seed) pairs, sample images from the
random noise and from the real golden step applied n times, score both with the world's reward, and report
the mean gain with a bootstrap 95% CI for each sampling guidance scale and n."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from golden_noise.cli import (HelpFormatter, add_dataclass_arguments, add_list_argument, check_flag_minimum,
                              dataclass_from_args)
from golden_noise.golden import GoldenConfig
from golden_noise.runtime import DEVICE_HELP, get_logger, run_cli, setup_logging

logger = get_logger("measure_oracle_gain")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--world", required=True, help="toy world directory (built by scripts/build_toy_world.py)")
    p.add_argument("--prompt_file", default=None, help="prompts to cycle through (default: the world's prompts.txt)")
    p.add_argument("--metric", default="toy_attributes", help="reward that scores the images (loaded with path=--world)")
    p.add_argument("--num_pairs", type=int, default=200, help="number of (prompt, seed) pairs")
    p.add_argument("--seed_base", type=int, default=1_000_000,
                   help="pair i uses seed seed_base + i and prompt i mod (number of prompts)")
    add_list_argument(p, "--n", item_type=int, default=[1, 2, 3], help="golden steps applied (oracle x'_n)")
    add_list_argument(p, "--guidance_scales", item_type=float, default=[1.0, 2.0, 3.0],
                      help="sampling guidance scales to compare at")
    p.add_argument("--num_inference_steps", type=int, default=10, help="DDIM sampling steps")
    add_dataclass_arguments(p, GoldenConfig)
    p.add_argument("--batch_size", type=int, default=50, help="pairs per UNet batch")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--output_json", default=None, help="also write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.num_pairs < 2:
        p.error("--num_pairs must be at least 2")
    if min(args.n) < 1:
        p.error("--n values must be >= 1")
    check_flag_minimum(p, args, ("schedule_steps",))
    check_flag_minimum(p, args, ("denoise_guidance_scale", "inversion_guidance_scale"), minimum=0)
    return args


def main(args):
    import torch

    from golden_noise.diffusion import load_pipeline
    from golden_noise.io import atomic_write_json
    from golden_noise.prompts import read_prompts
    from golden_noise.rewards.base import load_reward
    from golden_noise_toy.oracle import format_table, measure_oracle_gain

    setup_logging()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.world, dtype="float32", device=args.device)
    reward = load_reward(args.metric, path=args.world, device=args.device)
    prompts = [p.text for p in read_prompts(args.prompt_file or Path(args.world) / "prompts.txt")]
    pairs = [prompts[i % len(prompts)] for i in range(args.num_pairs)]
    seeds = [args.seed_base + i for i in range(args.num_pairs)]
    config = dataclass_from_args(GoldenConfig, args)
    result = measure_oracle_gain(pipe, reward, pairs, seeds, sorted(set(args.n)), args.guidance_scales,
                                 args.num_inference_steps, config, args.batch_size, quiet=args.quiet)
    result.update(world=args.world, metric=args.metric, seed_base=args.seed_base)
    print(format_table(result))
    if args.output_json:
        atomic_write_json(args.output_json, result)


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
