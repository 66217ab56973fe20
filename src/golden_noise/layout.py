"""The sequence dataset's file layout (DESIGN.md "file contracts"): the one place that names its files.

    <root>/run_config.json                      every parameter that shaped the data
    <root>/metadata.csv                         one row per complete sample, sorted by id
    <root>/sequences/{id}_source.pt             x_T                              (C, H, W)
    <root>/sequences/{id}_golden_sequence.pt    x'_1 ... x'_n                    (n, C, H, W)
    <root>/sequences/{id}_text.pt               the RNN's text embedding         (P,)
    <root>/sequences/{id}_prompt_embeds.pt      token embeddings (optional)      (77, D)

Stage 2 writes it, the training reader reads it, and the benches and tests build datasets with it.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Iterable, Mapping

from .io import atomic_torch_save, atomic_write_json, atomic_write_text

FORMAT_VERSION = 1
RUN_CONFIG = "run_config.json"
METADATA = "metadata.csv"
SEQUENCES = "sequences"
# tensor file columns of metadata.csv, in writing order: the golden sequence last, so a sample whose golden
# sequence exists has all its files
FILE_COLUMNS = ("source_noise_file", "text_embedding_file", "golden_sequence_file")
OPTIONAL_FILE_COLUMNS = ("prompt_embeds_file",)
METADATA_FIELDS = ("id", "prompt", "seed", "num_steps", "source_noise_file", "golden_sequence_file",
                   "text_embedding_file")
REQUIRED_METADATA = ("id", "num_steps", *FILE_COLUMNS)
_SUFFIX = {"source_noise_file": "source", "golden_sequence_file": "golden_sequence",
           "text_embedding_file": "text", "prompt_embeds_file": "prompt_embeds"}


def sample_files(sample_id: int, save_prompt_embeds: bool = False) -> dict[str, str]:
    """{metadata column: path relative to the dataset root} of one sample's files, in writing order."""
    columns = FILE_COLUMNS + (OPTIONAL_FILE_COLUMNS if save_prompt_embeds else ())
    ordered = sorted(columns, key=lambda c: c == "golden_sequence_file")
    return {c: f"{SEQUENCES}/{sample_id}_{_SUFFIX[c]}.pt" for c in ordered}


def metadata_fields(save_prompt_embeds: bool = False) -> list[str]:
    return list(METADATA_FIELDS) + (list(OPTIONAL_FILE_COLUMNS) if save_prompt_embeds else [])


def write_sample(root: str | Path, sample_id: int, tensors: Mapping[str, object],
                 save_prompt_embeds: bool = False) -> None:
    """Save one sample's tensors ({column: tensor}) atomically, the golden sequence last."""
    root = Path(root)
    for column, rel in sample_files(sample_id, save_prompt_embeds).items():
        atomic_torch_save(tensors[column], root / rel)


def write_metadata(root: str | Path, rows: Iterable[dict], save_prompt_embeds: bool = False) -> int:
    """Write metadata.csv from rows ({id, prompt, seed, num_steps}; file columns are filled in); returns the count."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=metadata_fields(save_prompt_embeds), lineterminator="\n")
    writer.writeheader()
    count = 0
    for row in sorted(rows, key=lambda r: int(r["id"])):
        writer.writerow({**row, **sample_files(int(row["id"]), save_prompt_embeds)})
        count += 1
    atomic_write_text(Path(root) / METADATA, buf.getvalue())
    return count


def write_run_config(root: str | Path, run_config: dict) -> None:
    atomic_write_json(Path(root) / RUN_CONFIG, run_config)


def read_run_config_json(root: str | Path) -> dict:
    """The raw run_config.json (no checks; sequence_data.load_run_config checks it)."""
    return json.loads((Path(root) / RUN_CONFIG).read_text(encoding="utf-8"))
