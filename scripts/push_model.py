#!/usr/bin/env python
"""Upload a trained noise-model export to the Hugging Face Hub: model.safetensors, config.json and a generated
model card (README.md) in one commit; `GoldenNoise.from_pretrained("owner/name")` then loads it.

    python scripts/push_model.py ./output/rnn_v3_seq_model_output/ owner/golden-noise-sdxl \
        --evaluation ./results/hps_eval/          # optional: a stage-6 results dir or a sweep dir, for the card
    python scripts/push_model.py ./output/rnn_v3_seq_model_output/ owner/golden-noise-sdxl --local_dir ./repo_preview

The export is checked as inference loads it (sealed config, strict keys, the keys that tie it to a pipeline)
before anything is uploaded. Log in first (`hf auth login`) or pass --token.
"""
from __future__ import annotations

import argparse
import sys

from golden_noise import hub
from golden_noise.cli import parser as make_parser
from golden_noise.export import load_export, push_export, stage_for_hub
from golden_noise.runtime import run_cli, setup_logging


def parse_args(argv=None) -> argparse.Namespace:
    p = make_parser(__doc__)
    p.add_argument("export", help="the export: the training --output_dir, its rnn_v3_model_final.safetensors / .json "
                                  "or their stem, or a folder / hub repo holding model.safetensors + config.json")
    p.add_argument("repo_id", help="the Hugging Face model repo to upload to (owner/name; created if needed)")
    p.add_argument("--evaluation", default=None,
                   help="summarise this evaluation in the card: an evaluate_hps.py --results_dir (or its "
                        "summary.json) or a sweep.py --output_dir (or its sweep.csv)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--token", default=None, help="token with write access (default: the one `hf auth login` saved, "
                                                 "or HF_TOKEN)")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument("--commit_message", default=None, help="commit message (default: 'Upload <model type> (step N)')")
    p.add_argument("--local_dir", default=None,
                   help="write the repo's files (model.safetensors, config.json, README.md) into this folder instead "
                        "of uploading them: a preview, or a folder GoldenNoise.from_pretrained loads")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> str:
    from pathlib import Path

    setup_logging()
    if args.local_dir:
        hub.check_repo_id(args.repo_id, "repo_id")
        folder = stage_for_hub(load_export(args.export, what="export"), Path(args.local_dir), args.repo_id,
                               args.evaluation)
        print(f"wrote {', '.join(hub.folder_files(folder))} to {folder} (nothing uploaded)")
        return str(folder)
    hub.check_can_push(args.repo_id, "repo_id", args.token)
    url = push_export(args.export, args.repo_id, token=args.token, private=args.private or None,
                      evaluation=args.evaluation, commit_message=args.commit_message, revision=args.revision,
                      what="repo_id")
    print(f"pushed to {url}")
    return url


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args))
