"""The sequence dataset's files (DESIGN.md "file contracts"): the one place that names them.

Format 2 (what stage 2 writes; `datasets.load_dataset(<root or hub id>, streaming=True)` reads it too):

    <root>/run_config.json               every parameter that shaped the data, the sharding included
    <root>/data/shard-{k:05d}.parquet    the samples at prompt-list positions [k*S, (k+1)*S), sorted by id
    <root>/index.json                    shard files, id ranges, rows, bytes, sha256, the run's fingerprint;
                                         written when every shard is sealed (the dataset is complete)
    <root>/staging/batch-{b:08d}.safetensors   stage 2's work area: global batch b's arrays and ids, with the
                                         sha256 of its tensors in its header; a shard is sealed from its batches,
                                         which then go; the folder goes when the index is written

A shard's columns (`features`): id int64, prompt string, seed int64, source [C,H,W], golden [n,C,H,W], text [P]
in the storage dtype, optionally prompt_embeds [T,D] and reward_standard / reward_golden / reward_gain float64.
S (`samples_per_shard`) is a multiple of the batch size, so a global batch never straddles two shards; a row group
holds `rows_per_group` samples (about ROW_GROUP_BYTES), so reading one sample reads little else.

Format 1 (older datasets; training and scripts/convert_dataset.py still read them): loose files per sample

    <root>/run_config.json, <root>/metadata.csv (one row per complete sample, sorted by id)
    <root>/sequences/{id}_source.pt, _golden_sequence.pt, _text.pt, [_prompt_embeds.pt], [_scores.pt]
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import Iterable, Mapping

from ..errors import UserError
from ..io import atomic_torch_save, atomic_write_json, atomic_write_text

FORMAT_VERSION = 2          # what stage 2 writes
LOOSE_FORMAT_VERSION = 1    # loose files per sample (still read)
RUN_CONFIG = "run_config.json"
INDEX = "index.json"
DATA = "data"
STAGING = "staging"
SEALED = "sealed"           # staging/sealed/shard-{k}.json: a sealed shard's record until the index holds it
METADATA = "metadata.csv"   # format 1
SEQUENCES = "sequences"     # format 1
SHARD_NAME = "shard-{:05d}.parquet"
ROW_GROUP_BYTES = 1 << 20   # a row group holds about 1 MiB of samples (at least one)
SHARD_BYTES = 1 << 30       # default samples_per_shard: about 1 GiB of samples per shard
PARQUET_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}

# tensor columns of a sample, in writing order: the golden sequence last, so a sample whose golden sequence exists
# has all its files (format 1's metadata.csv names them with these column names)
FILE_COLUMNS = ("source_noise_file", "text_embedding_file", "golden_sequence_file")
OPTIONAL_FILE_COLUMNS = ("prompt_embeds_file",)
SCORES_COLUMN = "scores_file"  # a scored dataset's tensor column: [reward_standard, reward_golden]
# a scored dataset's columns: the reward of the image sampled from x_T, from x'_n, and golden - standard
SCORE_FIELDS = ("reward_standard", "reward_golden", "reward_gain")
METADATA_FIELDS = ("id", "prompt", "seed", "num_steps", "source_noise_file", "golden_sequence_file",
                   "text_embedding_file")
REQUIRED_METADATA = ("id", "num_steps", *FILE_COLUMNS)
_SUFFIX = {"source_noise_file": "source", "golden_sequence_file": "golden_sequence",
           "text_embedding_file": "text", "prompt_embeds_file": "prompt_embeds", SCORES_COLUMN: "scores"}
# a shard's array column of each tensor file column
SHARD_COLUMN = {"source_noise_file": "source", "golden_sequence_file": "golden", "text_embedding_file": "text",
                "prompt_embeds_file": "prompt_embeds"}


def batch_path(root: str | Path, b: int) -> Path:
    """Stage 2's staging file of global batch b."""
    return Path(root) / STAGING / f"batch-{b:08d}.safetensors"


# ---- format 1's sample files -------------------------------------------------------------------------------------

def sample_files(sample_id: int, save_prompt_embeds: bool = False, scored: bool = False,
                 folder: str = SEQUENCES) -> dict[str, str]:
    """{column: path relative to the dataset root} of one format-1 sample's files, in writing order."""
    columns = FILE_COLUMNS + (OPTIONAL_FILE_COLUMNS if save_prompt_embeds else ()) + ((SCORES_COLUMN,) if scored
                                                                                       else ())
    ordered = sorted(columns, key=lambda c: c == "golden_sequence_file")
    return {c: f"{folder}/{sample_id}_{_SUFFIX[c]}.pt" for c in ordered}


def metadata_fields(save_prompt_embeds: bool = False, scored: bool = False) -> list[str]:
    return list(METADATA_FIELDS) + (list(OPTIONAL_FILE_COLUMNS) if save_prompt_embeds else []) + \
        ([SCORES_COLUMN, *SCORE_FIELDS] if scored else [])


def write_metadata(root: str | Path, rows: Iterable[dict], save_prompt_embeds: bool = False,
                   scored: bool = False) -> int:
    """Write format 1's metadata.csv from rows ({id, prompt, seed, num_steps} + SCORE_FIELDS when `scored`; file
    columns are filled in); returns the count. (Benches and tests build format-1 datasets with it.)"""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=metadata_fields(save_prompt_embeds, scored), lineterminator="\n")
    writer.writeheader()
    count = 0
    for row in sorted(rows, key=lambda r: int(r["id"])):
        writer.writerow({**row, **sample_files(int(row["id"]), save_prompt_embeds, scored)})
        count += 1
    atomic_write_text(Path(root) / METADATA, buf.getvalue())
    return count


def write_loose_sample(root: str | Path, sample_id: int, tensors: Mapping[str, object],
                       save_prompt_embeds: bool = False, scored: bool = False) -> None:
    """Save one format-1 sample's tensors ({column: tensor}) atomically, the golden sequence last."""
    for column, rel in sample_files(sample_id, save_prompt_embeds, scored).items():
        atomic_torch_save(tensors[column], Path(root) / rel)


# ---- run_config.json --------------------------------------------------------------------------------------------

def write_run_config(root: str | Path, run_config: dict) -> None:
    atomic_write_json(Path(root) / RUN_CONFIG, run_config)


def read_run_config_json(root: str | Path) -> dict:
    """The raw run_config.json (no checks; dataset.reader.load_run_config checks it)."""
    return json.loads((Path(root) / RUN_CONFIG).read_text(encoding="utf-8"))


def sample_bytes(run_config: dict) -> int:
    """Bytes of one sample's arrays in the storage dtype (source, golden sequence, text embedding)."""
    c, h, w = (int(s) for s in run_config["latent_shape"])
    item = 4 if run_config.get("storage_dtype") == "float32" else 2
    return item * ((1 + int(run_config["num_steps"])) * c * h * w + int(run_config["text_embedding"]["dim"]))


def sharding(run_config: dict, samples_per_shard: int | None = None) -> dict:
    """run_config's `sharding`: samples_per_shard (given, or about SHARD_BYTES rounded down to a multiple of the
    batch size), rows_per_group (about ROW_GROUP_BYTES) and the Parquet options; all of them shape the bytes."""
    batch, per_sample = int(run_config.get("batch_size") or 1), sample_bytes(run_config)
    if samples_per_shard is None:
        samples_per_shard = max(batch, SHARD_BYTES // per_sample // batch * batch)
    return {"samples_per_shard": int(samples_per_shard),
            "rows_per_group": max(1, min(int(samples_per_shard), ROW_GROUP_BYTES // per_sample)),
            "parquet": dict(PARQUET_OPTIONS)}


def with_sharding(run_config: dict, samples_per_shard: int | None = None) -> dict:
    """`run_config` as format 2 records it: format_version 2 and `sharding` after `batch_size`."""
    shards = sharding(run_config, samples_per_shard)
    out = {}
    for key, value in run_config.items():
        if key != "sharding":
            out[key] = FORMAT_VERSION if key == "format_version" else value
        if key == "batch_size":
            out["sharding"] = shards
    if "sharding" not in out:
        out["sharding"] = shards
    return out


def run_fingerprint(run_config: dict, keys: Iterable[str]) -> str:
    """sha256 of the settings (`keys` of run_config) that shaped the data: equal for every machine of one run."""
    record = {k: run_config.get(k) for k in keys}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


# ---- shards and the index ---------------------------------------------------------------------------------------

def shard_name(k: int) -> str:
    return SHARD_NAME.format(k)


def shard_path(root: str | Path, k: int) -> Path:
    return Path(root) / DATA / shard_name(k)


def seal_record_path(root: str | Path, k: int) -> Path:
    return Path(root) / STAGING / SEALED / f"shard-{k:05d}.json"


def num_shards(num_samples: int, samples_per_shard: int) -> int:
    return -(-num_samples // samples_per_shard)


def features(run_config: dict, prompt_embeds_shape: tuple[int, int] | None = None, scored: bool = False):
    """The shards' `datasets.Features` (their Arrow schema is written into every shard)."""
    from datasets import Array2D, Array3D, Array4D, Features, List, Value

    c, h, w = (int(s) for s in run_config["latent_shape"])
    n, dim = int(run_config["num_steps"]), int(run_config["text_embedding"]["dim"])
    dtype = "float32" if run_config.get("storage_dtype") == "float32" else "float16"
    cols = {"id": Value("int64"), "prompt": Value("string"), "seed": Value("int64"),
            "source": Array3D(shape=(c, h, w), dtype=dtype), "golden": Array4D(shape=(n, c, h, w), dtype=dtype),
            "text": List(Value(dtype), length=dim)}
    if prompt_embeds_shape is not None:
        cols["prompt_embeds"] = Array2D(shape=tuple(prompt_embeds_shape), dtype=dtype)
    if scored:
        cols.update({k: Value("float64") for k in SCORE_FIELDS})
    return Features(cols)


def read_index(root: str | Path) -> dict | None:
    """index.json, or None when the dataset has none yet (not every shard is sealed)."""
    path = Path(root) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        for s in index["shards"]:
            str(s["file"]), int(s["rows"]), int(s["bytes"]), str(s["sha256"]), int(s["first_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read {path} ({e!r}): rerun generate_npd_series.py --finalize on the dataset") \
            from None
    return index


def build_index(run_config: dict, records: list[dict], run_keys: Iterable[str]) -> dict:
    """index.json from every shard's seal record (in shard order)."""
    run_keys = list(run_keys)
    run_fp = run_fingerprint(run_config, run_keys)
    content = hashlib.sha256(run_fp.encode())
    for r in records:
        content.update(f"\n{r['file']} {r['sha256']}".encode())
    return {"format_version": FORMAT_VERSION, "run_keys": list(run_keys), "run_fingerprint": run_fp,
            "fingerprint": content.hexdigest(),
            "num_samples": sum(int(r["rows"]) for r in records), "num_shards": len(records),
            "samples_per_shard": run_config["sharding"]["samples_per_shard"],
            "bytes": sum(int(r["bytes"]) for r in records), "shards": records}
