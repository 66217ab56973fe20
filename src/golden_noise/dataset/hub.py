"""Pushing a sharded dataset to the Hugging Face Hub with its card (`push_dataset`), through golden_noise.hub
(uploads, one-line errors). Training from a hub dataset id is dataset.reader.resolve_dataset's."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .. import hub
from ..errors import UserError
from ..runtime import get_logger
from . import format as F
from .card import dataset_card
from .reader import load_run_config, read_shard_index
from .shards import verify_shards

logger = get_logger(__name__)
CARD = "README.md"


def push_dataset(dataset_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                 prompt_source: str | None = None, commit_message: str | None = None) -> dict:
    """Upload a finished sharded dataset to the hub dataset repo `repo_id` (created if needed): run_config.json,
    index.json, the shards (each checked against its sha256 first) and a dataset card naming the repo; shards the
    repo holds and the index no longer lists are removed. Returns {url, files, bytes, samples}."""
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
