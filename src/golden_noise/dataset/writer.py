"""Writing the sharded dataset (golden_noise.dataset.format): stage 2's staging files (one per global batch),
sealing a shard from them (or from a format-1 dataset's loose files), unsealing one (a longer prompt list), and the
index.

Integrity: a staging file is a safetensors file (no pickle) whose header records the sha256 of its tensor bytes,
computed when it is written; `read_batch` checks it (one flipped byte fails), and the ids, shapes, dtypes and
values, on resume and when a shard is sealed. A format-1 file is checked by `load_checked` (each zip entry's CRC-32,
which torch.save records, and the pickle inside, before it is loaded weights-only). A sealed shard's sha256 is
recorded (its seal record, then index.json) and checked on resume and before training.

Crash safety: a staging file appears atomically; a shard is written beside its final name, its record written,
then renamed into place, and only then are its staging files removed. A kill -9 anywhere leaves a state that the
same command finishes, with the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..io import (BackgroundWriter, atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256,
                  load_tensor, tensor_file_problem)
from ..runtime import get_logger, resolve_dtype
from . import format as F
from .card import CARD, dataset_card
from .shards import ShardFile, sealed_records

logger = get_logger(__name__)
STAGING_FORMAT = "golden-noise staging batch"


@dataclass(frozen=True)
class SampleSpec:
    """What a sample's arrays must be: {shard column: per-sample shape (None: any 2-D)} and the storage dtype
    (`scores`, [reward_standard, reward_golden], is float64)."""

    shapes: dict
    dtype: torch.dtype
    save_prompt_embeds: bool = False
    scored: bool = False

    @classmethod
    def of(cls, run_config: dict) -> "SampleSpec":
        c, h, w = (int(s) for s in run_config["latent_shape"])
        n, dim = int(run_config["num_steps"]), int(run_config["text_embedding"]["dim"])
        embeds, scored = bool(run_config.get("save_prompt_embeds")), run_config.get("scoring") is not None
        shapes = {"source": (c, h, w), "golden": (n, c, h, w), "text": (dim,)}
        if embeds:
            shapes["prompt_embeds"] = None
        if scored:
            shapes["scores"] = (2,)
        return cls(shapes, resolve_dtype(run_config.get("storage_dtype") or "float16"), embeds, scored)

    def dtype_of(self, column: str) -> torch.dtype:
        return torch.float64 if column == "scores" else self.dtype

    def problem(self, column: str, t: torch.Tensor, rows: int | None = None) -> str | None:
        """Why tensor `t` is not column `column` (of `rows` samples, or of one), or None."""
        shape = self.shapes[column]
        lead = () if rows is None else (rows,)
        if t.dtype != self.dtype_of(column) or (tuple(t.shape) != (*lead, *shape) if shape is not None
                                                  else t.dim() != 2 + len(lead)):
            return (f"holds {column} as a {t.dtype} tensor of shape {tuple(t.shape)}, expected "
                    f"{self.dtype_of(column)} {(*lead, *shape) if shape is not None else '2-D'}")
        if not torch.isfinite(t).all():
            return f"holds NaN or inf values in {column}"
        return None


# ---- stage 2's staging files: one per global batch -----------------------------------------------------------

def _header(blob: bytes) -> tuple[dict, int]:
    """A safetensors file's JSON header and where its tensor bytes start."""
    (size,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + size]), 8 + size


def batch_bytes(ids: Sequence[int], arrays: dict) -> bytes:
    """A staging file: the batch's ids and arrays ({shard column: (B, ...) tensor}) as safetensors, the sha256 of
    the tensor bytes in its header."""
    from safetensors.torch import save

    tensors = {"ids": torch.tensor(list(ids), dtype=torch.int64),
               **{k: v.detach().cpu().contiguous() for k, v in arrays.items()}}
    plain = save(tensors)
    digest = hashlib.sha256(memoryview(plain)[_header(plain)[1]:]).hexdigest()
    return save(tensors, metadata={"format": STAGING_FORMAT, "sha256": digest})  # the same tensor bytes


def _read_bytes(path: Path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None), or (None, why): missing, or unreadable (with the OS's reason)."""
    try:
        return path.read_bytes(), None
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


def read_batch(path: Path, ids: Sequence[int], spec: SampleSpec) -> tuple[dict | None, str | None]:
    """({shard column: (B, ...) array}, None) for an intact staging file holding the samples `ids`, else
    (None, why): its sha256, ids, shapes, dtypes and values are checked (every byte read)."""
    from safetensors.torch import load

    blob, why = _read_bytes(path)
    if blob is None:
        return None, why
    try:
        header, start = _header(blob)
        meta = header.get("__metadata__") or {}
        if meta.get("format") != STAGING_FORMAT:
            return None, "is not a staging file of stage 2"
        if hashlib.sha256(memoryview(blob)[start:]).hexdigest() != meta.get("sha256"):
            return None, "fails its sha256 check (a damaged byte)"
        tensors = load(blob)
    except Exception as e:  # truncated, not safetensors, a bad header
        return None, f"is not a complete staging file ({type(e).__name__}): truncated or foreign"
    if tensors.get("ids") is None or tensors["ids"].tolist() != list(ids):
        return None, "holds other samples"
    if set(tensors) != {"ids", *spec.shapes}:
        return None, f"holds the arrays {sorted(set(tensors) - {'ids'})}, expected {sorted(spec.shapes)}"
    for column in spec.shapes:
        why = spec.problem(column, tensors[column], len(ids))
        if why:
            return None, why
    return {k: v.numpy() for k, v in tensors.items() if k != "ids"}, None


class StagingWriter:
    """Writes staging files on a background thread so file I/O overlaps the next batch's UNet work."""

    def __init__(self, root: Path):
        self.root = root
        self.writer = BackgroundWriter(max_pending=4, drain_to=2)

    def submit(self, b: int, ids: Sequence[int], arrays: dict[str, torch.Tensor]) -> None:
        """Queue global batch b's file: its ids and arrays ({shard column: (B, ...) tensor on the CPU})."""
        self.writer.submit(lambda: atomic_write_bytes(F.batch_path(self.root, b), batch_bytes(ids, arrays)))

    def close(self) -> None:
        self.writer.close()


# ---- format 1's loose files ----------------------------------------------------------------------------------

LOOSE_COLUMN = {"source_noise_file": "source", "golden_sequence_file": "golden", "text_embedding_file": "text",
                "prompt_embeds_file": "prompt_embeds", F.SCORES_COLUMN: "scores"}


def load_checked(path: Path, column: str, spec: SampleSpec) -> tuple[torch.Tensor | None, str | None]:
    """(tensor, None) for an intact format-1 sample file of shard column `column`, else (None, why): its
    checksums and pickle (io.tensor_file_problem), then its shape, dtype and values once loaded weights-only."""
    data, why = _read_bytes(path)
    if data is None:
        return None, why
    problem = tensor_file_problem(data)
    if problem:
        return None, problem
    try:
        t = load_tensor(path, data)
    except UserError as e:
        return None, str(e).splitlines()[0]
    if not isinstance(t, torch.Tensor):
        return None, f"holds a {type(t).__name__}, not a tensor"
    return (None, why) if (why := spec.problem(column, t)) else (t, None)


def loose_chunks(source: Path, samples: Sequence["ShardSample"], spec: SampleSpec) -> Iterator[tuple[list, dict]]:
    """A format-1 dataset's samples as (ids, {shard column: (1, ...) array}) chunks, each file checked."""
    for s in samples:
        arrays = {}
        for column, rel in F.sample_files(s.id, spec.save_prompt_embeds, spec.scored).items():
            t, why = load_checked(source / rel, LOOSE_COLUMN[column], spec)
            if why:
                raise UserError(f"{source / rel} {why}: regenerate that sample with the stage 2 that wrote it, or "
                                "remove it from the dataset")
            arrays[LOOSE_COLUMN[column]] = t.numpy()[None]
        yield [s.id], arrays


# ---- shards -------------------------------------------------------------------------------------------------

def _nested(values: np.ndarray, dims: Sequence[int]):
    """(R, *dims) array -> Arrow nested lists of depth len(dims) (datasets' ArrayXD storage)."""
    import pyarrow as pa

    out, count = pa.array(values.reshape(-1)), values.size
    for d in reversed(dims):
        count //= d
        out = pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * d), out)
    return out


def _table(schema, columns: dict):
    """An Arrow table of `schema` (the shards' features) from {name: numpy array or list}."""
    import pyarrow as pa

    arrays = []
    for field in schema:
        values = columns[field.name]
        if isinstance(field.type, pa.ExtensionType):  # Array2D/3D/4D
            arrays.append(pa.ExtensionArray.from_storage(field.type, _nested(values, values.shape[1:])))
        elif pa.types.is_fixed_size_list(field.type):
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


@dataclass(frozen=True)
class ShardSample:
    """A row of a shard: the sample id, its prompt and seed."""

    id: int
    prompt: str
    seed: int


def seal_shard(root: Path, k: int, samples: Sequence[ShardSample], run_config: dict,
               chunks: Iterable[tuple[list, dict]]) -> dict:
    """Write shard k of `root` from its samples' arrays, given in order as (ids, {shard column: (n, ...) array})
    chunks (stage 2's staging batches, or format 1's loose files); returns its seal record {file, shard, first_id,
    last_id, rows, bytes, sha256}, written before the shard takes its name."""
    import pyarrow.parquet as pq

    spec = SampleSpec.of(run_config)
    rows_per_group = int(run_config["sharding"]["rows_per_group"])
    path, writer, pending, done = F.shard_path(root, k), None, [], 0
    expected = iter(samples)

    def flush(rows: list) -> None:
        nonlocal writer, schema
        group = [s for s, _ in rows]
        columns = {"id": [s.id for s in group], "prompt": [s.prompt for s in group], "seed": [s.seed for s in group]}
        for column in spec.shapes:
            stacked = np.stack([arrays[column] for _, arrays in rows])
            if column == "scores":  # (R, 2) float64: standard, golden
                columns.update(zip(F.SCORE_FIELDS, (stacked[:, 0], stacked[:, 1], stacked[:, 1] - stacked[:, 0])))
            else:
                columns[column] = stacked
        if writer is None:
            embeds = columns["prompt_embeds"].shape[1:] if spec.save_prompt_embeds else None
            schema = F.features(run_config, embeds, spec.scored).arrow_schema
            writer = pq.ParquetWriter(tmp, schema, **run_config["sharding"]["parquet"])
        writer.write_table(_table(schema, columns), row_group_size=rows_per_group)

    schema = None
    with atomic_path(path) as tmp:
        try:
            for ids, arrays in chunks:
                for j, sample_id in enumerate(ids):
                    sample = next(expected, None)
                    if sample is None or sample.id != sample_id:
                        raise UserError(f"shard {k} of {root}: sample {sample_id} comes where "
                                        f"{sample.id if sample else 'no sample'} belongs")
                    pending.append((sample, {c: a[j] for c, a in arrays.items()}))
                    done += 1
                    if len(pending) == rows_per_group:
                        flush(pending)
                        pending = []
            if pending:
                flush(pending)
            if done != len(samples):
                raise UserError(f"shard {k} of {root}: {done} of its {len(samples)} samples were given")
        finally:
            if writer is not None:
                writer.close()
        record = {"file": f"{F.DATA}/{F.shard_name(k)}", "shard": k, "first_id": samples[0].id,
                  "last_id": samples[-1].id, "rows": len(samples), "bytes": tmp.stat().st_size,
                  "sha256": file_sha256(tmp)}
        atomic_write_json(F.seal_record_path(root, k), record)  # before the rename: a sealed shard has a record
    return record


def unseal_shard(root: Path, k: int, positions: range, batch_size: int, run_config: dict) -> int:
    """Put shard k's samples at prompt-list `positions` (whole global batches) back into staging files, then
    remove the index, the shard and its record; returns how many samples went back. Each step is idempotent: a
    kill between them leaves a state that the same call finishes."""
    path, restored = F.shard_path(root, k), 0
    per_shard = int(run_config["sharding"]["samples_per_shard"])
    if path.exists():
        shard, spec = ShardFile(path), SampleSpec.of(run_config)
        columns = [c for c in spec.shapes if c != "scores"] + (list(F.SCORE_FIELDS[:2]) if spec.scored else [])
        ids, arrays = [], {c: [] for c in spec.shapes}
        position = k * per_shard
        for g in range(shard.num_row_groups):
            rows = shard.read_row_group(g, ("id", *columns))
            for j, sample_id in enumerate(rows["id"].tolist()):
                if position in positions:
                    ids.append(sample_id)
                    for c in spec.shapes:
                        arrays[c].append(np.stack([rows["reward_standard"][j], rows["reward_golden"][j]])
                                         if c == "scores" else rows[c][j])
                    if len(ids) == batch_size:
                        b = position // batch_size
                        atomic_write_bytes(F.batch_path(root, b), batch_bytes(
                            ids, {c: torch.from_numpy(np.stack(v)) for c, v in arrays.items()}))
                        restored += len(ids)
                        ids, arrays = [], {c: [] for c in spec.shapes}
                position += 1
    remove_index(root)
    path.unlink(missing_ok=True)
    F.seal_record_path(root, k).unlink(missing_ok=True)
    return restored


def remove_index(root: Path) -> None:
    """Remove index.json (the dataset is about to change), its shards' records going back to seal records first."""
    index = F.read_index(root)
    if index is None:
        return
    for record in index["shards"]:
        path = F.seal_record_path(root, int(record["shard"]))
        if not path.exists():
            atomic_write_json(path, record)
    (root / F.INDEX).unlink()


def finalize(root: Path, run_config: dict, run_keys: Sequence[str]) -> list[int]:
    """Write index.json and the dataset card (README.md, whose YAML lets `datasets.load_dataset` read the shards)
    when every shard is sealed, and remove the staging folder; returns the shards that are not sealed yet (nothing
    is written then). Files with the same content are left as they are."""
    total = F.num_shards(int(run_config["num_prompts"]), int(run_config["sharding"]["samples_per_shard"]))
    records = sealed_records(root, range(total))
    missing = [k for k in range(total) if k not in records]
    if missing:
        return missing
    index = F.build_index(run_config, [records[k] for k in range(total)], run_keys)
    if F.read_index(root) != index:
        atomic_write_json(root / F.INDEX, index)
    card = dataset_card(root, run_config, index)
    if not (root / CARD).is_file() or (root / CARD).read_text(encoding="utf-8") != card:
        atomic_write_text(root / CARD, card)
    shutil.rmtree(root / F.STAGING, ignore_errors=True)
    return []
