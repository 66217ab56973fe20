"""Build a toy world (a tiny SDXL-architecture pipeline trained on procedural shapes, plus its reward model)
that every stage loads with `--base_model_id PATH`, exactly like SDXL; optionally with its student, the teacher
distilled into a 1-4-step sampler without CFG (`--student`, or `--student_only` to add it to an existing world)."""
from __future__ import annotations

import argparse
import json
import sys

from golden_noise.runtime import get_logger, run_cli, setup_logging
from golden_noise_toy import PRESETS, build_student, build_world
from golden_noise_toy.student import format_student

logger = get_logger("build_toy_world")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", required=True,
                        help="where to write the world: a diffusers StableDiffusionXLPipeline directory plus "
                             "toy_reward/, prompts.txt and world.json")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="size of the build: default (<= 15 min on 2 CPU cores), small (a few minutes, CI), "
                             "test (seconds; its samples are noise). With --student or --student_only the student's "
                             "preset of the same name (its default one: about 11 min more on 1 thread)")
    parser.add_argument("--seed", type=int, default=0, help="the build is a deterministic function of preset and seed")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (results are reproducible for a fixed thread count)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty --output_dir (with --student_only: only its student/)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--student", action="store_true",
                      help="also distil the world's student into OUTPUT_DIR/student and add its card to world.json")
    mode.add_argument("--student_only", action="store_true",
                      help="add the student to the existing world at --output_dir, leaving the world's other files "
                           "as they are (the student trains with 1 thread whatever --threads says)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(args):
    import signal

    import torch

    # a terminated build exits through Python, so the half-built directory beside --output_dir is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup_logging()
    torch.set_num_threads(args.threads)
    if args.student_only:
        logger.info("Adding a student to the toy world %r (preset %s, seed %d)", args.output_dir, args.preset,
                    args.seed)
        card = build_student(args.output_dir, args.preset, args.seed, overwrite=args.overwrite, quiet=args.quiet)
        print(f"student written to {args.output_dir}/student in {card['timings']['total_s']:.0f}s")
        print(format_student(card))
        return
    logger.info("Building toy world %r (preset %s, seed %d, %d threads)", args.output_dir, args.preset, args.seed,
                args.threads)
    s = build_world(args.output_dir, args.preset, args.seed, overwrite=args.overwrite, quiet=args.quiet,
                    student=args.student)
    t = s["timings"]
    lines = [
        f"toy world written to {s['output_dir']}",
        f"  captions: {s['captions']}   images {s['image_size']} px   latents {tuple(s['latent_shape'])}",
        f"  params: UNet {s['unet_params']:,}  text encoders {s['text_encoder_params']:,}  VAE {s['vae_params']:,}"
        f"  reward {s['classifier_params']:,}",
        f"  VAE reconstruction MSE {s['vae_recon_mse']}   UNet loss {s['unet_loss']}",
        f"  reward accuracy (all attributes): clean {s['reward_accuracy_clean']['all']:.3f}   "
        f"VAE reconstructions {s['reward_accuracy_vae']['all']:.3f}",
    ]
    for key, r in s["sampling"].items():
        lines.append(f"  samples {key.replace('_', ' ')} ({r['images']} images, {r['steps']} steps): accuracy "
                     f"{r['accuracy']:.3f}   mean reward {r['mean_reward']:.3f}")
    lines.append("  time: " + "  ".join(f"{k[:-2]} {v:.0f}s" for k, v in t.items()))
    if "student" in s:
        lines.append(format_student(s["student"]))
    print("\n".join(lines))
    logger.debug(json.dumps(s))


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
