#!/usr/bin/env python
"""Push a sharded golden-noise sequence dataset (stage 2's --output_dir) to a Hugging Face Hub dataset repo, with a
dataset card (model, golden step, prompt source, counts, scores if any).

    python scripts/push_dataset.py ./data/npd_sequence_dataset_sdxl user/npd-sdxl
    python src/train_rnn_model_v3.py --dataset_dir user/npd-sdxl ...   # then train from it anywhere

Every shard is checked against its sha256 before anything is sent; the repo is created when missing (--private to
keep it private) and receives run_config.json, index.json, data/*.parquet (shards it no longer lists are deleted)
and README.md. Needs a token with write access (`hf auth login`, HF_TOKEN or --token) and the network.
"""
from __future__ import annotations

import argparse
import sys

from golden_noise.cli import parser
from golden_noise.dataset.hub import push_dataset
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("dataset_dir", metavar="DATASET_DIR", help="a finished sharded dataset (it has index.json)")
    p.add_argument("repo_id", metavar="REPO_ID", help="the hub dataset repo, owner/name")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--prompt_source", default=None,
                   help="where the prompts came from, for the card (default: run_config.json's prompt_file)")
    p.add_argument("--commit_message", default=None, help="the commit's message (default: the sample count)")
    p.add_argument("--token", default=None, help="a Hugging Face token (default: the logged-in one, or HF_TOKEN)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    setup_logging(quiet_diffusion_libraries=False)
    out = push_dataset(args.dataset_dir, args.repo_id, private=args.private, token=args.token,
                       prompt_source=args.prompt_source, commit_message=args.commit_message)
    print(f"done: {out['samples']} samples ({out['bytes'] / 1e9:.3g} GB, {len(out['files'])} files) pushed to "
          f"https://huggingface.co/datasets/{args.repo_id} ({out['url']})")
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
