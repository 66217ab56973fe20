"""The sequence dataset's file layout (DESIGN.md "file contracts"): the one place that names its files.

    <root>/run_config.json                      every parameter that shaped the data
    <root>/metadata.csv                         one row per complete sample, sorted by id
    <root>/sequences/{id}_source.pt             x_T                              (C, H, W)
    <root>/sequences/{id}_golden_sequence.pt    x'_1 ... x'_n                    (n, C, H, W)
    <root>/sequences/{id}_text.pt               the RNN's text embedding         (P,)
    <root>/sequences/{id}_prompt_embeds.pt      token embeddings (optional)      (77, D)
    <root>/sequences/{id}_scores.pt             rewards of the standard and the golden image (optional, scored
                                                datasets: --score_metric)        (2,) float64

Stage 2 writes it, the training reader reads it, and the benches and tests build datasets with it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import struct
from pathlib import Path
from typing import Collection, Iterable, Mapping

from .io import atomic_torch_save, atomic_write_json, atomic_write_text

FORMAT_VERSION = 1
RUN_CONFIG = "run_config.json"
METADATA = "metadata.csv"
SEQUENCES = "sequences"
# tensor file columns of metadata.csv, in writing order: the golden sequence last, so a sample whose golden
# sequence exists has all its files
FILE_COLUMNS = ("source_noise_file", "text_embedding_file", "golden_sequence_file")
OPTIONAL_FILE_COLUMNS = ("prompt_embeds_file",)
SCORES_COLUMN = "scores_file"  # a scored dataset's tensor column: [reward_standard, reward_golden]
# a scored dataset's metadata columns: the reward of the image sampled from x_T, from x'_n, and golden - standard
SCORE_FIELDS = ("reward_standard", "reward_golden", "reward_gain")
METADATA_FIELDS = ("id", "prompt", "seed", "num_steps", "source_noise_file", "golden_sequence_file",
                   "text_embedding_file")
REQUIRED_METADATA = ("id", "num_steps", *FILE_COLUMNS)
_SUFFIX = {"source_noise_file": "source", "golden_sequence_file": "golden_sequence",
           "text_embedding_file": "text", "prompt_embeds_file": "prompt_embeds", SCORES_COLUMN: "scores"}


def sample_files(sample_id: int, save_prompt_embeds: bool = False, scored: bool = False) -> dict[str, str]:
    """{metadata column: path relative to the dataset root} of one sample's files, in writing order."""
    columns = FILE_COLUMNS + (OPTIONAL_FILE_COLUMNS if save_prompt_embeds else ()) + ((SCORES_COLUMN,) if scored
                                                                                       else ())
    ordered = sorted(columns, key=lambda c: c == "golden_sequence_file")
    return {c: f"{SEQUENCES}/{sample_id}_{_SUFFIX[c]}.pt" for c in ordered}


def metadata_fields(save_prompt_embeds: bool = False, scored: bool = False) -> list[str]:
    return list(METADATA_FIELDS) + (list(OPTIONAL_FILE_COLUMNS) if save_prompt_embeds else []) + \
        ([SCORES_COLUMN, *SCORE_FIELDS] if scored else [])


def write_sample(root: str | Path, sample_id: int, tensors: Mapping[str, object],
                 save_prompt_embeds: bool = False, only: Collection[str] | None = None, scored: bool = False) -> None:
    """Save one sample's tensors ({column: tensor}) atomically, the golden sequence last; `only` names the
    columns to (re)write, leaving the sample's other files untouched."""
    root = Path(root)
    for column, rel in sample_files(sample_id, save_prompt_embeds, scored).items():
        if only is None or column in only:
            atomic_torch_save(tensors[column], root / rel)


def score_fields(root: str | Path, sample_id: int) -> dict[str, str]:
    """A scored sample's metadata values: reward_standard, reward_golden and reward_gain (full float precision)."""
    from .io import load_tensor

    standard, golden = (float(v) for v in load_tensor(Path(root) / sample_files(sample_id, scored=True)[
        SCORES_COLUMN]).double())  # (2,)
    return dict(zip(SCORE_FIELDS, map(repr, (standard, golden, golden - standard))))


def read_reward_gains(root: str | Path) -> dict[int, float] | None:
    """{sample id: reward_gain} from metadata.csv, or None when the dataset was not scored (no such column)."""
    with open(Path(root) / METADATA, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if "reward_gain" not in (reader.fieldnames or []):
            return None
        return {int(r["id"]): float(r["reward_gain"]) for r in reader}


def write_metadata(root: str | Path, rows: Iterable[dict], save_prompt_embeds: bool = False,
                   scored: bool = False) -> int:
    """Write metadata.csv from rows ({id, prompt, seed, num_steps} + SCORE_FIELDS when `scored`; file columns are
    filled in); returns the count.

    An existing metadata.csv with the same text is left as it is (a rerun that adds nothing changes no file)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=metadata_fields(save_prompt_embeds, scored), lineterminator="\n")
    writer.writeheader()
    count = 0
    for row in sorted(rows, key=lambda r: int(r["id"])):
        writer.writerow({**row, **sample_files(int(row["id"]), save_prompt_embeds, scored)})
        count += 1
    path = Path(root) / METADATA
    try:
        unchanged = path.read_text(encoding="utf-8") == buf.getvalue()
    except (OSError, UnicodeDecodeError):
        unchanged = False
    if not unchanged:
        atomic_write_text(path, buf.getvalue())
    return count


def write_run_config(root: str | Path, run_config: dict) -> None:
    atomic_write_json(Path(root) / RUN_CONFIG, run_config)


def read_run_config_json(root: str | Path) -> dict:
    """The raw run_config.json (no checks; sequence_data.load_run_config checks it)."""
    return json.loads((Path(root) / RUN_CONFIG).read_text(encoding="utf-8"))


# The end of a torch.save file (a zip archive): [central directory][zip64 end record (56 B)][zip64 locator (20 B)]
# [end-of-central-directory record (22 B), no comment]. A truncated file loses this tail.
_EOCD = struct.Struct("<4sHHHHIIH")           # signature, disks, entries here, entries, cd size, cd offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sIQI")      # signature, disk, zip64 record offset, disks
_ZIP64_RECORD = struct.Struct("<4sQHHIIQQQQ")  # signature, size, versions, disks, entries here, entries, cd size/offset
_CENTRAL_ENTRY = struct.Struct("<4s16xIIHHH8xI")  # signature, packed size, size, name/extra/comment len, offset
_TAIL_BYTES = 4096  # enough for the central directory of a tensor file (about 500 B)


def tensor_file_intact(path: str | os.PathLike) -> bool:
    """A fast structural check of a tensor file written by torch.save (no unpickling, no data read): the zip's
    end records are where the file's size puts them, and the central directory they point to lists entries that
    lie inside the file. False for a missing, truncated or foreign (e.g. plain pickle) file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES))
    except OSError:  # e.g. a directory
        return False
    finally:
        os.close(fd)
    return len(tail) >= _EOCD.size and _zip_tail_ok(tail, size)


def _zip_tail_ok(tail: bytes, size: int) -> bool:
    """The zip structure check of `tensor_file_intact` on the file's last bytes `tail` (a file of `size` bytes)."""
    base = size - len(tail)  # file offset of tail[0]
    signature, _, _, _, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, len(tail) - _EOCD.size)
    if signature != b"PK\x05\x06" or comment:
        return False
    cd_end = size - _EOCD.size
    locator = len(tail) - _EOCD.size - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":  # zip64: the counts are in the zip64 record
        cd_end = _ZIP64_LOCATOR.unpack_from(tail, locator)[2]
        if not base <= cd_end <= locator + base - _ZIP64_RECORD.size:
            return False
        record = _ZIP64_RECORD.unpack_from(tail, cd_end - base)
        if record[0] != b"PK\x06\x06":
            return False
        entries, cd_size, cd_offset = record[7:10]
    if entries == 0 or cd_offset + cd_size != cd_end:
        return False
    if cd_offset < base:  # a central directory larger than the tail: its bounds were checked, not its entries
        return True
    pos = cd_offset - base
    for _ in range(entries):  # each entry's local data must end before the central directory starts
        if pos + _CENTRAL_ENTRY.size > cd_end - base:
            return False
        signature, packed, _, name_len, extra_len, comment_len, local_offset = _CENTRAL_ENTRY.unpack_from(tail, pos)
        if signature != b"PK\x01\x02":
            return False
        if local_offset != 0xFFFFFFFF and packed != 0xFFFFFFFF and local_offset + 30 + packed > cd_offset:
            return False
        pos += _CENTRAL_ENTRY.size + name_len + extra_len + comment_len
    return pos == cd_end - base


def damaged_columns(root: str | Path, sample_id: int, save_prompt_embeds: bool = False,
                    scored: bool = False) -> list[str]:
    """The columns of one sample whose file is missing, truncated or unreadable (`tensor_file_intact`)."""
    root = os.fspath(root)
    return [column for column, rel in sample_files(sample_id, save_prompt_embeds, scored).items()
            if not tensor_file_intact(os.path.join(root, rel))]
