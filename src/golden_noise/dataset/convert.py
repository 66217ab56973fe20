"""Convert a format-1 dataset (loose files per sample, metadata.csv) into the sharded format 2: the same samples,
each file checked (its checksums and pickle, then shape, dtype and values) as stage 2 checks its own staging files,
sealed range by range into shards (the old folder is only read). Resumable: a rerun finishes a killed conversion.
The shards hold the same bytes as stage 2 would have written for the same data and settings."""
from __future__ import annotations

import csv
from pathlib import Path

from ..errors import UserError
from ..runs import RunLock, check_writable_dir, jsonable, read_settings
from ..runtime import get_logger
from . import format as F
from .generate import SIGNATURE_KEYS
from .reader import load_run_config, read_metadata
from .shards import sealed_records
from .writer import SampleSpec, ShardSample, finalize, loose_chunks, seal_shard

logger = get_logger(__name__)


def loose_samples(old: Path, run_config: dict) -> list[ShardSample]:
    """The samples of a complete format-1 dataset in id order (= their positions in its prompt list)."""
    rows = read_metadata(old, int(run_config["num_steps"]))
    with open(old / F.METADATA, encoding="utf-8", newline="") as f:
        meta = {int(r["id"]): r for r in csv.DictReader(f)}
    expected = run_config.get("num_prompts")
    if expected is not None and expected != len(rows):
        raise UserError(f"{old / F.METADATA} lists {len(rows)} of the {expected} samples of {old / F.RUN_CONFIG}: "
                        "the dataset is incomplete; finish it with the stage 2 that wrote it, then convert")
    start = int(run_config.get("start_seed", 0))
    return [ShardSample(r.id, meta[r.id].get("prompt", ""), int(meta[r.id].get("seed") or start + r.id))
            for r in rows]


def convert_dataset(old: str | Path, new: str | Path, samples_per_shard: int | None = None) -> dict:
    """Write NEW (format 2) from OLD (format 1); returns counts. NEW must be a new (or empty) folder, or a
    conversion of the same OLD that was interrupted."""
    old, new = Path(old), Path(new)
    run_config = load_run_config(old)
    if run_config.get("format_version", F.LOOSE_FORMAT_VERSION) != F.LOOSE_FORMAT_VERSION:
        raise UserError(f"{old} is already a sharded dataset (format_version {run_config['format_version']}): "
                        "train on it as it is")
    samples = loose_samples(old, run_config)
    run_config.setdefault("num_prompts", len(samples))
    target = F.with_sharding(run_config, samples_per_shard)
    batch = int(run_config.get("batch_size") or 1)
    if target["sharding"]["samples_per_shard"] % batch:
        raise UserError(f"--samples_per_shard {samples_per_shard} must be a multiple of the dataset's batch_size "
                        f"{batch}")
    check_writable_dir(new, "NEW")
    with RunLock(new, "NEW"):
        existing = read_settings(new / F.RUN_CONFIG, "NEW")
        if existing is None and any(p.name != ".lock" for p in new.iterdir()):
            raise UserError(f"NEW {new} is not empty: choose a new folder")
        if existing is not None and existing != jsonable(target):
            raise UserError(f"NEW {new} holds another dataset (its run_config.json differs): choose a new folder")
        if existing is None:
            F.write_run_config(new, target)
        per_shard = target["sharding"]["samples_per_shard"]
        total = F.num_shards(len(samples), per_shard)
        done = sealed_records(new, range(total))
        for k in range(total):
            if k not in done:
                part = samples[k * per_shard:(k + 1) * per_shard]
                record = seal_shard(new, k, part, target, loose_chunks(old, part, SampleSpec.of(target)))
                logger.info("sealed %s: %d samples, ids %d-%d", record["file"], record["rows"], record["first_id"],
                            record["last_id"])
        missing = finalize(new, target, SIGNATURE_KEYS)
    assert not missing, missing
    index = F.read_index(new)
    return {"samples": index["num_samples"], "shards": index["num_shards"], "converted_now": total - len(done),
            "bytes": index["bytes"], "files_before": sum(1 for _ in (old / F.SEQUENCES).iterdir()),
            "bytes_before": sum(p.stat().st_size for p in (old / F.SEQUENCES).iterdir())}
