"""Sharded datasets on the Hugging Face Hub: training from a hub dataset id (`resolve_dataset`) and pushing a
dataset with its card (`push_dataset`), through golden_noise.hub (snapshots from the hub or the offline cache,
uploads, one-line errors).

A hub id's files (run_config.json, index.json, the card and the shards) are fetched into the Hugging Face cache
(`snapshot_download`: resumable, shared with huggingface_hub and datasets) and read from there like a local
folder; with HF_HUB_OFFLINE=1 they must be in the cache already. Fetching whole shards rather than reading byte
ranges over HTTP is deliberate: training verifies every shard's sha256 before the first step and its seeded global
shuffle touches every shard in the first steps, so a lazy reader would move the same bytes with far more requests.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import hub
from ..errors import UserError
from ..runtime import get_logger
from . import format as F

logger = get_logger(__name__)
CARD = "README.md"
PATTERNS = (F.RUN_CONFIG, F.INDEX, CARD, f"{F.DATA}/*.parquet")  # what a dataset repo holds


def resolve_dataset(name: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a dataset: `name` itself when it is a path, else the hub dataset repo's snapshot in the
    Hugging Face cache (fetched when online)."""
    if not hub.is_repo_id(str(name)):
        return Path(name)
    folder = hub.snapshot(str(name), repo_type="dataset", revision=revision, allow_patterns=PATTERNS,
                          what="--dataset_dir")
    if not (folder / F.RUN_CONFIG).is_file():
        raise UserError(f"--dataset_dir {name}: the repo has no {F.RUN_CONFIG}: it is not a golden-noise sequence "
                        "dataset (push one with scripts/push_dataset.py)")
    logger.info("--dataset_dir %s: the hub dataset's files in %s", name, folder)
    return folder


def push_dataset(dataset_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                 prompt_source: str | None = None, commit_message: str | None = None) -> dict:
    """Upload a finished sharded dataset to the hub dataset repo `repo_id` (created if needed): run_config.json,
    index.json, the shards (each checked against its sha256 first) and a dataset card naming the repo; shards the
    repo holds and the index no longer lists are removed. Returns {url, files, bytes, samples}."""
    from .card import dataset_card
    from .reader import load_run_config, read_shard_index
    from .writer import verify_shards

    hub.check_can_push(repo_id, "REPO_ID", token)
    root = Path(dataset_dir)
    run_config = load_run_config(root)
    if run_config.get("format_version", F.LOOSE_FORMAT_VERSION) != F.FORMAT_VERSION:
        raise UserError(f"{root} is a format-1 dataset (loose files): convert it with scripts/convert_dataset.py "
                        "first, then push the sharded copy")
    index = read_shard_index(root, run_config)
    bad = verify_shards(root, index["shards"])
    if bad:
        record, why = bad[0]
        raise UserError(f"{root / record['file']} {why}: rerun generate_npd_series.py with the dataset's flags to "
                        "remake it, then push")
    files = [F.RUN_CONFIG, F.INDEX, *[r["file"] for r in index["shards"]]]
    with tempfile.TemporaryDirectory() as tmp:  # the upload: links to the dataset's files, and the repo's card
        stage = Path(tmp)
        for rel in files:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).symlink_to((root / rel).resolve())
        (stage / CARD).write_text(dataset_card(root, run_config, index, repo_id=repo_id, prompt_source=prompt_source),
                                  encoding="utf-8")
        url = hub.upload_folder(stage, repo_id, repo_type="dataset", token=token, private=private,
                                commit_message=commit_message or f"golden-noise dataset: {index['num_samples']} "
                                                                 f"samples in {index['num_shards']} shards",
                                delete_patterns=[f"{F.DATA}/*.parquet"], what="REPO_ID")
    return {"url": url, "files": [*files, CARD], "bytes": index["bytes"], "samples": index["num_samples"]}
