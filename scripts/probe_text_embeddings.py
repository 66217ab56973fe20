"""Linear-probe each text embedding a pipeline offers (--text_embedding of stage 2) for the attributes of a toy
world's captions: fitted on the training captions, scored on held-out ones. Shows which embedding lets the RNN
generalise to unseen prompts (in the built-in world the pooled one loses the position words)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from golden_noise.diffusion import load_pipeline
from golden_noise.errors import UserError
from golden_noise.prompts import read_prompts
from golden_noise.runtime import DEVICE_HELP, run_cli, setup_logging
from golden_noise.tables import format_table
from golden_noise_toy import WorldSpec, load_world_card
from golden_noise_toy.probe import probe_text_embeddings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world", default="worlds/toy_shapes", help="toy world directory (scripts/build_toy_world.py)")
    p.add_argument("--test_prompt_file", default=None,
                   help="held-out captions (e.g. the quickstart's data/quickstart/test_captions.txt); default: a "
                        "seeded random --test_size of the world's captions")
    p.add_argument("--test_size", type=int, default=24, help="held-out captions when no --test_prompt_file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random held-out split")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    return p.parse_args(argv)


def main(args):
    import torch

    setup_logging()
    world = Path(args.world)
    spec = WorldSpec.from_dict(load_world_card(world)["config"]["spec"])
    captions = [p.text for p in read_prompts(world / "prompts.txt")]
    if args.test_prompt_file:
        held_out = [p.text for p in read_prompts(args.test_prompt_file)]
    else:
        if not 0 < args.test_size < len(captions):
            raise UserError(f"--test_size {args.test_size} must be between 1 and {len(captions) - 1}")
        order = torch.randperm(len(captions), generator=torch.Generator().manual_seed(args.seed)).tolist()
        held_out = [captions[i] for i in order[:args.test_size]]
    pipe = load_pipeline(str(world), dtype="float32", device=args.device)
    result = probe_text_embeddings(pipe, captions, held_out, spec.attributes)
    names = list(next(iter(result.values())))
    print(f"held-out accuracy of a linear probe ({len(held_out)} held-out captions, "
          f"{len(set(captions) - set(held_out))} training)")
    rows = [[kind] + [f"{accs[n]:.2f}" for n in names] for kind, accs in result.items()]
    print(format_table(rows, header=["text embedding", *names], rule=False, align_right=range(1, len(names) + 1)))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
