"""Writing the sharded dataset (golden_noise.dataset.format): stage 2's per-sample staging files, sealing a range of
them into an immutable Parquet shard, unsealing one (a longer prompt list), and the index.

Integrity: every staging file is a torch.save zip, which records a CRC-32 of each entry when it is written;
`load_checked` reads every byte and checks it (one flipped byte fails), checks that the pickle inside is a plain
tensor's (a foreign pickle fails before anything loads it), then loads it (weights only) and checks its shape, dtype
and values. It runs on resume and when a range is sealed. A sealed shard's sha256 is recorded (its seal record, then
index.json) and checked on resume and before training.

Crash safety: a staging file appears atomically; a shard is written beside its final name, its record written, then
renamed into place, and only then are its staging files removed. A kill -9 anywhere leaves a state that the same
command finishes, with the same bytes.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np
import torch

from ..errors import UserError
from ..io import (BackgroundWriter, atomic_path, atomic_torch_save, atomic_write_json, file_sha256, load_tensor,
                  tensor_file_problem)
from ..runtime import get_logger, resolve_dtype
from . import format as F

logger = get_logger(__name__)


@dataclass(frozen=True)
class SampleSpec:
    """What each tensor file of a sample must hold: {column: shape (None: any 2-D)} and the storage dtype."""

    shapes: dict
    dtype: torch.dtype
    save_prompt_embeds: bool = False
    scored: bool = False

    @classmethod
    def of(cls, run_config: dict) -> "SampleSpec":
        c, h, w = (int(s) for s in run_config["latent_shape"])
        n, dim = int(run_config["num_steps"]), int(run_config["text_embedding"]["dim"])
        embeds, scored = bool(run_config.get("save_prompt_embeds")), run_config.get("scoring") is not None
        shapes = {"source_noise_file": (c, h, w), "golden_sequence_file": (n, c, h, w), "text_embedding_file": (dim,)}
        if embeds:
            shapes["prompt_embeds_file"] = None
        if scored:
            shapes[F.SCORES_COLUMN] = (2,)
        return cls(shapes, resolve_dtype(run_config.get("storage_dtype") or "float16"), embeds, scored)

    def files(self, sample_id: int, folder: str = F.STAGING) -> dict[str, str]:
        return F.sample_files(sample_id, self.save_prompt_embeds, self.scored, folder)


def load_checked(path: Path, column: str, spec: SampleSpec) -> tuple[torch.Tensor | None, str | None]:
    """(tensor, None) for an intact sample file, else (None, why): checksums, pickle, shape, dtype, finite values."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    problem = tensor_file_problem(data)
    if problem:
        return None, problem
    try:
        t = load_tensor(path, data)
    except UserError as e:
        return None, str(e).splitlines()[0]
    dtype = torch.float64 if column == F.SCORES_COLUMN else spec.dtype
    shape = spec.shapes[column]
    if not isinstance(t, torch.Tensor):
        return None, f"holds a {type(t).__name__}, not a tensor"
    if t.dtype != dtype or (tuple(t.shape) != shape if shape is not None else t.dim() != 2):
        return None, f"holds a {t.dtype} tensor of shape {tuple(t.shape)}, expected {dtype} {shape or '2-D'}"
    if not torch.isfinite(t).all():
        return None, "contains NaN or inf values"
    return t, None


def damaged_columns(root: Path, sample_id: int, spec: SampleSpec, folder: str = F.STAGING) -> dict[str, str]:
    """{column: why} for each file of a sample that is missing or not intact (`load_checked`: reads every byte)."""
    out = {}
    for column, rel in spec.files(sample_id, folder).items():
        _, why = load_checked(root / rel, column, spec)
        if why:
            out[column] = why
    return out


class StagingWriter:
    """Writes samples' staging files on a background thread so file I/O overlaps the next batch's UNet work."""

    def __init__(self, root: Path, spec: SampleSpec):
        self.root, self.spec = root, spec
        self.writer = BackgroundWriter(max_pending=4, drain_to=2)

    def submit(self, sample_id: int, tensors: dict[str, torch.Tensor], only: Collection[str] | None = None) -> None:
        """Queue one sample's tensors ({column: tensor}); `only` names the columns to write (default: all)."""
        # .clone(): a saved view would carry its whole batch's storage
        todo = {c: tensors[c].detach().to("cpu", torch.float64 if c == F.SCORES_COLUMN else self.spec.dtype).clone()
                for c in self.spec.files(sample_id) if only is None or c in only}
        self.writer.submit(self._write, sample_id, todo)

    def _write(self, sample_id: int, tensors: dict) -> None:
        for column, rel in self.spec.files(sample_id).items():  # the golden sequence last
            if column in tensors:
                atomic_torch_save(tensors[column], self.root / rel)

    def close(self) -> None:
        self.writer.close()


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


def seal_shard(root: Path, k: int, samples: Sequence[ShardSample], run_config: dict, source: Path | None = None,
               folder: str = F.STAGING, remove_sources: bool = True) -> dict:
    """Write shard k of `root` from the samples' loose files (`source`/`folder`, default root/staging), each one
    checked (`load_checked`); returns its seal record {file, shard, first_id, last_id, rows, bytes, sha256}."""
    import pyarrow.parquet as pq

    source = Path(source) if source is not None else root
    spec = SampleSpec.of(run_config)
    rows_per_group = int(run_config["sharding"]["rows_per_group"])
    path = F.shard_path(root, k)
    writer = None
    with atomic_path(path) as tmp:
        try:
            for start in range(0, len(samples), rows_per_group):
                group = samples[start:start + rows_per_group]
                tensors: dict[str, list] = {}
                for s in group:
                    for column, rel in spec.files(s.id, folder).items():
                        t, why = load_checked(source / rel, column, spec)
                        if why:
                            raise UserError(f"{source / rel} {why}: rerun generate_npd_series.py with the same "
                                            "flags to regenerate it" if folder == F.STAGING else
                                            f"{source / rel} {why}: regenerate that sample")
                        tensors.setdefault(column, []).append(t.numpy())
                columns = {"id": [s.id for s in group], "prompt": [s.prompt for s in group],
                           "seed": [s.seed for s in group]}
                columns.update({F.SHARD_COLUMN[c]: np.stack(v) for c, v in tensors.items() if c != F.SCORES_COLUMN})
                if spec.scored:
                    scores = np.stack(tensors[F.SCORES_COLUMN])  # (R, 2) float64: standard, golden
                    columns.update(zip(F.SCORE_FIELDS, (scores[:, 0], scores[:, 1], scores[:, 1] - scores[:, 0])))
                if writer is None:
                    embeds = columns["prompt_embeds"].shape[1:] if spec.save_prompt_embeds else None
                    schema = F.features(run_config, embeds, spec.scored).arrow_schema
                    writer = pq.ParquetWriter(tmp, schema, **run_config["sharding"]["parquet"])
                writer.write_table(_table(schema, columns), row_group_size=rows_per_group)
        finally:
            if writer is not None:
                writer.close()
        record = {"file": f"{F.DATA}/{F.shard_name(k)}", "shard": k, "first_id": samples[0].id,
                  "last_id": samples[-1].id, "rows": len(samples), "bytes": tmp.stat().st_size,
                  "sha256": file_sha256(tmp)}
        atomic_write_json(F.seal_record_path(root, k), record)  # before the rename: a sealed shard has a record
    if remove_sources:
        for s in samples:
            for rel in spec.files(s.id, folder).values():
                (source / rel).unlink(missing_ok=True)
    return record


def unseal_shard(root: Path, k: int, keep: Collection[int], run_config: dict) -> int:
    """Put the samples `keep` of shard k back into staging files (the same bytes stage 2 wrote), then remove the
    index, the shard and its record; returns how many samples went back. Each step is idempotent: a kill between
    them leaves a state that the same call finishes."""
    from .reader import ShardFile

    spec = SampleSpec.of(run_config)
    path, restored = F.shard_path(root, k), 0
    if path.exists():
        shard = ShardFile(path)
        for g in range(shard.num_row_groups):
            rows = shard.read_row_group(g, ("id", *F.SHARD_COLUMN.values(), *F.SCORE_FIELDS))
            for j, sample_id in enumerate(rows["id"].tolist()):
                if sample_id not in keep:
                    continue
                files = spec.files(sample_id)
                for column, rel in files.items():
                    if column == F.SCORES_COLUMN:
                        t = torch.tensor([rows["reward_standard"][j], rows["reward_golden"][j]], dtype=torch.float64)
                    else:
                        t = torch.from_numpy(rows[F.SHARD_COLUMN[column]][j].copy())
                    atomic_torch_save(t, root / rel)
                restored += 1
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


def sealed_records(root: Path, shards: Iterable[int]) -> dict[int, dict]:
    """{k: record} of the shards among `shards` that are sealed: the file exists with the size its seal record (or
    index.json) gives. Cheap: no byte is read (the sha256 is checked by `verify_shards`)."""
    import json

    index = F.read_index(root)
    listed = {int(s["shard"]): s for s in index["shards"]} if index else {}
    out = {}
    for k in shards:
        record = listed.get(k)
        if record is None:
            try:
                record = json.loads(F.seal_record_path(root, k).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
        try:
            if F.shard_path(root, k).stat().st_size == int(record["bytes"]):
                out[k] = record
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return out


def finalize(root: Path, run_config: dict, run_keys: Sequence[str]) -> list[int]:
    """Write index.json and the dataset card (README.md, whose YAML lets `datasets.load_dataset` read the shards)
    when every shard is sealed, and remove the staging folder; returns the shards that are not sealed yet (nothing
    is written then). Files with the same content are left as they are."""
    from ..io import atomic_write_text
    from .card import CARD, dataset_card

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


def verify_shards(root: Path, records: Iterable[dict]) -> list[tuple[dict, str]]:
    """[(record, why)] for each shard whose bytes are not what its record says (size, then sha256: reads all)."""
    bad = []
    for r in records:
        path = root / r["file"]
        try:
            size = os.path.getsize(path)
        except OSError:
            bad.append((r, "is missing"))
            continue
        if size != int(r["bytes"]):
            bad.append((r, f"has {size} bytes, its record says {r['bytes']}"))
        elif file_sha256(path) != r["sha256"]:
            bad.append((r, "fails its sha256 check (a damaged byte)"))
    return bad
