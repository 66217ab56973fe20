"""Reading the shards of a sharded dataset (golden_noise.dataset.format): a shard's row groups as arrays
(`ShardFile`), which shards are sealed (`sealed_records`) and whether their bytes are intact (`verify_shards`).
Everything here only reads; the writer, the reader, the card and stage 2 build on it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import UserError
from ..io import file_sha256
from . import format as F


class ShardFile:
    """One Parquet shard, opened on first use (and again in a forked loader worker): row groups as numpy arrays.

    The array columns of a shard stage 2 wrote (PLAIN, uncompressed, no nulls: `format.PARQUET_OPTIONS`) are read
    straight from their data pages (`_plain_values`): the values section of a page is the tensor's bytes, so a
    sample costs one read and no per-value decoding (pyarrow decodes float16 value by value, ~10x slower). Any
    other layout is read by pyarrow."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._file = self._fd = self._pid = self._shapes = self._leaves = None

    def __getstate__(self):
        return {"path": self.path, "_file": None, "_fd": None, "_pid": None, "_shapes": None, "_leaves": None}

    @property
    def file(self):
        import pyarrow.parquet as pq

        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = pq.ParquetFile(self.path, pre_buffer=False), os.getpid()
            self._fd = os.open(self.path, os.O_RDONLY)  # for the pages read directly (the process's own)
        return self._file

    @property
    def num_row_groups(self) -> int:
        return self.file.metadata.num_row_groups

    def shapes(self) -> dict[str, tuple]:
        """{column: per-row shape} (scalar columns: ()) from the shard's features (its `huggingface` schema
        metadata)."""
        if self._shapes is None:
            features = json.loads(self.file.schema_arrow.metadata[b"huggingface"])["info"]["features"]
            self._shapes = {name: tuple(f["shape"]) if "shape" in f else (int(f["length"]),) if "length" in f else ()
                            for name, f in features.items()}
        return self._shapes

    def leaves(self) -> dict[str, tuple]:
        """{array column: (leaf column index, numpy dtype, max repetition level, max definition level)} of the
        columns whose values are fixed-width floats."""
        if self._leaves is None:
            schema, self._leaves = self.file.metadata.schema, {}
            for j in range(len(schema)):
                col = schema.column(j)
                dtype = {"FIXED_LEN_BYTE_ARRAY": np.float16, "FLOAT": np.float32}.get(col.physical_type)
                if dtype is not None and (dtype is np.float32 or col.length == 2):
                    self._leaves[col.path.split(".")[0]] = (j, dtype, col.max_repetition_level,
                                                            col.max_definition_level)
        return self._leaves

    def read_row_group(self, group: int, columns) -> dict[str, np.ndarray]:
        """{column: (R, *shape) array} of row group `group` (columns the shard lacks are left out)."""
        shapes, out = self.shapes(), {}
        meta = self.file.metadata.row_group(group)
        rest = []
        for name in (c for c in columns if c in shapes):
            values = self._fast_column(meta, name) if shapes[name] and name in self.leaves() else None
            if values is None:
                rest.append(name)
            else:
                out[name] = values
        if rest:
            out.update(self._arrow_columns(group, rest))
        for name, values in out.items():
            if shapes[name]:
                shape = (meta.num_rows, *shapes[name])
                if values.size != math.prod(shape):
                    raise UserError(f"{self.path} row group {group}: column {name} holds {values.size} values, "
                                    f"expected {shape}: the shard is not what stage 2 writes")
                out[name] = values.reshape(shape)
        return out

    def _fast_column(self, meta, name: str) -> np.ndarray | None:
        """The values of a float column chunk read from its data pages, or None when its layout is another."""
        j, dtype, max_rep, max_def = self.leaves()[name]
        chunk = meta.column(j)
        if chunk.compression != "UNCOMPRESSED" or chunk.dictionary_page_offset is not None:
            return None
        data = os.pread(self._fd, chunk.total_compressed_size, chunk.data_page_offset)
        try:
            values = _plain_values(data, np.dtype(dtype).itemsize, max_rep > 0, max_def > 0)
        except _NotPlain:
            return None
        return np.frombuffer(values, dtype=dtype) if len(values) == chunk.num_values * np.dtype(dtype).itemsize \
            else None

    def _arrow_columns(self, group: int, columns: list[str]) -> dict[str, np.ndarray]:
        import pyarrow as pa

        table = self.file.read_row_group(group, columns=columns, use_threads=False)
        out = {}
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if isinstance(col, pa.ExtensionArray):
                col = col.storage
            while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
                col = col.flatten()
            out[name] = col.to_numpy(zero_copy_only=False)
        return out

    def column(self, name: str) -> np.ndarray:
        """One scalar column of the whole shard (e.g. id, reward_gain)."""
        return self.file.read(columns=[name], use_threads=False).column(0).to_numpy()


class _NotPlain(Exception):
    """A column chunk that is not PLAIN, uncompressed data pages without nulls."""


def _plain_values(chunk: bytes, width: int, has_rep: bool, has_def: bool):
    """The values of a column chunk of Parquet data pages (v1, PLAIN, uncompressed) whose every level entry holds
    a value: each page's values section, after its length-prefixed level sections, concatenated (a view of
    `chunk` when it has one page)."""
    parts, pos, view = [], 0, memoryview(chunk)
    while pos < len(chunk):
        header, pos = _thrift_struct(chunk, pos)
        page = header.get(5)  # DataPageHeader: 1 num_values, 2 encoding, 3 def encoding, 4 rep encoding
        if header.get(1) != 0 or page is None or page.get(2) != 0 or header.get(2) != header.get(3):
            raise _NotPlain  # not a v1 data page, not PLAIN, or compressed
        size, start = header[3], pos
        pos += size
        for present in (has_rep, has_def):  # repetition levels, then definition levels, each length-prefixed
            if present:
                start += 4 + int.from_bytes(chunk[start:start + 4], "little")
        if pos - start != page[1] * width:
            raise _NotPlain  # a null or an empty list: fewer values than level entries
        parts.append(view[start:pos])
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _thrift_struct(buf: bytes, pos: int) -> tuple[dict, int]:
    """A Thrift compact-protocol struct (Parquet's page headers) as {field id: value}."""
    fields, last = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return fields, pos
        kind, delta = head & 0x0F, head >> 4
        if delta:
            last += delta
        else:
            raw, pos = _varint(buf, pos)
            last = (raw >> 1) ^ -(raw & 1)
        fields[last], pos = _thrift_value(buf, pos, kind)


def _thrift_value(buf: bytes, pos: int, kind: int, in_list: bool = False):
    if kind in (1, 2):  # booleans: the value is in the type (or a byte inside lists)
        return (buf[pos] == 1, pos + 1) if in_list else (kind == 1, pos)
    if kind == 3:
        return buf[pos], pos + 1
    if kind in (4, 5, 6):  # i16, i32, i64: zigzag varints
        raw, pos = _varint(buf, pos)
        return (raw >> 1) ^ -(raw & 1), pos
    if kind == 7:
        return buf[pos:pos + 8], pos + 8
    if kind == 8:
        n, pos = _varint(buf, pos)
        return buf[pos:pos + n], pos + n
    if kind in (9, 10):
        head = buf[pos]
        pos += 1
        n, element = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        items = []
        for _ in range(n):
            item, pos = _thrift_value(buf, pos, element, in_list=True)
            items.append(item)
        return items, pos
    if kind == 12:
        return _thrift_struct(buf, pos)
    raise _NotPlain  # maps and anything else: not in a page header


def sealed_records(root: Path, shards: Iterable[int]) -> dict[int, dict]:
    """{k: record} of the shards among `shards` that are sealed: the file exists with the size its seal record (or
    index.json) gives. Cheap: no byte is read (the sha256 is checked by `verify_shards`)."""
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
