"""Measure whether golden noise helps in a toy world: for held-out (prompt, seed) pairs, sample images from the
random noise and from the real golden step applied n times, score both with the world's reward, and report
the mean gain with a bootstrap 95% CI for each sampling guidance scale and n."""
from __future__ import annotations

import sys
from pathlib import Path

from golden_noise.cli import (SEED_RULES, add_dataclass_arguments, add_list_argument, argument, check_seeds,
                              dataclass_from_args, parser)
from golden_noise.diffusion import load_pipeline
from golden_noise.golden import GoldenConfig
from golden_noise.io import atomic_write_json
from golden_noise.prompts import read_prompts
from golden_noise.rewards.base import load_reward
from golden_noise.runtime import DEVICE_HELP, get_logger, run_cli, setup_logging
from golden_noise_toy.oracle import format_table, measure_oracle_gain

logger = get_logger("measure_oracle_gain")


def parse_args(argv=None):
    p = parser(__doc__, first_paragraph=False)
    p.add_argument("--world", required=True, help="toy world directory (built by scripts/build_toy_world.py)")
    p.add_argument("--prompt_file", default=None, help="prompts to cycle through (default: the world's prompts.txt)")
    p.add_argument("--metric", default="toy_attributes", help="reward that scores the images (loaded with path=--world)")
    argument(p, "--num_pairs", type=int, default=200, help="number of (prompt, seed) pairs", min=2)
    argument(p, "--seed_base", type=int, default=1_000_000,
             help="pair i uses seed seed_base + i and prompt i mod (number of prompts)", **SEED_RULES)
    add_list_argument(p, "--n", item_type=int, default=[1, 2, 3], help="golden steps applied (oracle x'_n)", min=1)
    add_list_argument(p, "--guidance_scales", item_type=float, default=[1.0, 2.0, 3.0],
                      help="sampling guidance scales to compare at", min=0)
    argument(p, "--num_inference_steps", type=int, default=10, help="DDIM sampling steps", min=1)
    add_dataclass_arguments(p, GoldenConfig)
    argument(p, "--batch_size", type=int, default=50, help="pairs per UNet batch", min=1)
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    argument(p, "--threads", type=int, default=2, help="torch CPU threads", min=1)
    p.add_argument("--output_json", default=None, help="also write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)  # the golden step's ranges are GoldenConfig's
    check_seeds("--seed_base", args.seed_base, args.num_pairs - 1, "the last pair index")
    return args


def main(args):
    import torch

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
