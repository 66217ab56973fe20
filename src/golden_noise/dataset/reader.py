"""The golden-noise sequence dataset read for training (stage 3): both formats (golden_noise.dataset.format).

Format 2 (shards): the index lists every shard with its sha256, checked before training (every byte read once);
training reads it map-style, sample by sample, in the trainer's own seeded order (training.core.EpochSampler), so
the batches are exactly those of a format-1 dataset with the same samples. A sample costs one row group read (row
groups hold about 1 MiB), and each process (each loader worker) keeps an LRU cache of decoded row groups bounded by
`cache_bytes`: memory stays flat for any dataset size, and nothing is converted or copied to local disk first.

Format 1 (loose files): `metadata.csv` lists complete samples; every listed file is checked before training (each
zip entry's CRC-32, which torch.save recorded, and the pickle inside: no unpickling), and every tensor is checked
against run_config.json when loaded.

A hub dataset id (`resolve_dataset`, pushed by scripts/push_dataset.py) is fetched into the Hugging Face cache
(resumable, shared with huggingface_hub and datasets; offline, found there) and read from there like a local folder.
Whole shards rather than byte ranges over HTTP, deliberately: every shard's sha256 is checked before the first step
and the seeded global shuffle touches every shard at once, so a lazy reader would move the same bytes with far more
requests.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import io
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .. import hub
from ..errors import UserError
from ..export import canonical_json
from ..io import load_tensor, tensor_file_problem
from ..runtime import DTYPES, get_logger
from . import format as F
from .shards import ShardFile, sealed_records, verify_shards

logger = get_logger(__name__)
CACHE_BYTES = 256 << 20  # decoded row groups kept per process (per loader worker)
HUB_PATTERNS = (F.RUN_CONFIG, F.INDEX, "README.md", f"{F.DATA}/*.parquet")  # what a hub dataset repo holds


def resolve_dataset(name: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a dataset: `name` itself when it is a path, else the hub dataset repo's snapshot in the
    Hugging Face cache (fetched when online)."""
    if not hub.is_repo_id(str(name)):
        return Path(name)
    folder = hub.snapshot(str(name), repo_type="dataset", revision=revision, allow_patterns=HUB_PATTERNS,
                          what="--dataset_dir")
    if not (folder / F.RUN_CONFIG).is_file():
        raise UserError(f"--dataset_dir {name}: the repo has no {F.RUN_CONFIG}: it is not a golden-noise sequence "
                        "dataset (push one with scripts/push_dataset.py)")
    logger.info("--dataset_dir %s: the hub dataset's files in %s", name, folder)
    return folder


def load_run_config(dataset_dir: str | Path) -> dict:
    """Read and check `run_config.json` (format_version, latent_shape, num_steps, text_embedding.dim)."""
    path = Path(dataset_dir) / F.RUN_CONFIG
    if not Path(dataset_dir).is_dir():
        raise UserError(f"dataset directory {dataset_dir} does not exist: pass the --output_dir of "
                        "generate_npd_series.py (or a hub dataset id) as --dataset_dir")
    try:
        cfg = F.read_run_config_json(dataset_dir)
    except FileNotFoundError:
        raise UserError(f"missing {path}: the dataset was not written by generate_npd_series.py "
                        "(or is incomplete); regenerate it") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    try:
        shape = [int(s) for s in cfg["latent_shape"]]
        n = int(cfg["num_steps"])
        dim = int(cfg["text_embedding"]["dim"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} lacks a valid latent_shape / num_steps / text_embedding.dim ({e!r}): "
                        "regenerate the dataset with generate_npd_series.py") from None
    if len(shape) != 3 or min(shape) < 1 or n < 1 or dim < 1:
        raise UserError(f"{path}: invalid latent_shape {shape}, num_steps {n} or text_embedding.dim {dim}")
    version = cfg.get("format_version", F.LOOSE_FORMAT_VERSION)
    if version not in (F.LOOSE_FORMAT_VERSION, F.FORMAT_VERSION):
        raise UserError(f"{path} has format_version {version}; this code reads versions "
                        f"{F.LOOSE_FORMAT_VERSION} and {F.FORMAT_VERSION}")
    return cfg


def split_ids(ids: list[int], validation_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic split by id: ids ranked by a hash of the id; the first round(f * N) validate.

    Depends only on the set of ids (not on order, seed or process count)."""
    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
    n_val = round(validation_fraction * len(ids))
    if validation_fraction > 0 and len(ids) >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, len(ids) - 1)
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"golden-noise-split:{i}".encode()).hexdigest())
    val = set(ranked[:n_val])
    return [i for i in ids if i not in val], [i for i in ids if i in val]


# ---- samples ------------------------------------------------------------------------------------------------

class SequenceDataset(Dataset):
    """Samples {id, source (C, H, W), golden (n, C, H, W), text (P,), valid, error} as `dtype` tensors (float32,
    or with `keep_dtype` the storage dtype: a loader then moves half the bytes, and the trainer converts on its
    device, `as_float`, to the same values); `rows` has one entry per sample (with its `id`), which a format's
    subclass turns into tensors (`_arrays`).

    A sample that cannot be read or has the wrong shape raises a UserError naming its file; with `return_errors`
    it comes back zero-filled with valid=False and the error string instead (from a loader worker too), so the
    training loop can stop every process with that message, or skip the sample while batch shapes (and every
    process's step count) stay fixed and the loss ignores it.
    """

    def __init__(self, rows: list, latent_shape, text_dim: int, num_steps: int, max_seq_len: int | None = None,
                 return_errors: bool = False, dtype: torch.dtype = torch.float32):
        self.rows = list(rows)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.text_dim, self.num_steps = int(text_dim), int(num_steps)
        self.seq_len = min(self.num_steps, max_seq_len) if max_seq_len else self.num_steps
        self.return_errors, self.dtype = return_errors, dtype

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.rows]

    def subset(self, ids) -> "SequenceDataset":
        """A copy holding only the samples whose id is in `ids` (same order)."""
        keep = set(ids)
        out = replace_rows(self, [r for r in self.rows if r.id in keep])
        return out

    def _arrays(self, row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def load_sample(self, i: int) -> dict:
        """Load and check sample i (raises UserError on a bad file)."""
        row = self.rows[i]
        source, golden, text = (t.to(self.dtype) for t in self._arrays(row))  # (C, H, W), (n, C, H, W), (P,)
        return {"id": row.id, "source": source, "golden": golden[: self.seq_len], "text": text, "valid": True,
                "error": ""}

    def __getitem__(self, i: int) -> dict:
        try:
            return self.load_sample(i)
        except UserError as e:
            if not self.return_errors:
                raise
            c, h, w = self.latent_shape
            zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype)  # noqa: E731
            return {"id": self.rows[i].id, "source": zeros(c, h, w), "golden": zeros(self.seq_len, c, h, w),
                    "text": zeros(self.text_dim), "valid": False, "error": str(e)}


def replace_rows(dataset: SequenceDataset, rows: list) -> SequenceDataset:
    import copy

    out = copy.copy(dataset)
    out.rows = rows
    return out


def _finite(t: torch.Tensor) -> bool:
    # A sum is NaN/inf iff an element is (finite values cannot overflow these accumulators): 40x cheaper than an
    # elementwise isfinite, which would dominate the loading time.
    return bool(torch.isfinite(t.sum(dtype=torch.float32 if t.dtype == torch.float16 else torch.float64)))


def as_float(batch: dict) -> dict:
    """A collated batch with its tensors in float32 (the trainer's device converts a storage-dtype batch: the exact
    values a float32 loader would have given)."""
    return {**batch, **{k: batch[k].float() for k in ("source", "golden", "text")}}


def collate(samples: list[dict]) -> dict:
    """Stack samples: source (B, C, H, W), golden (B, n, C, H, W), text (B, P), valid (B,), id (B,).

    `default_collate` stacks straight into shared memory inside a loader worker (one copy fewer)."""
    stack = lambda key: default_collate([s[key] for s in samples])  # noqa: E731
    return {
        "id": torch.tensor([s["id"] for s in samples], dtype=torch.long),
        "source": stack("source"),
        "golden": stack("golden"),
        "text": stack("text"),
        "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
        "errors": [s["error"] for s in samples if s["error"]],
        "bad_ids": [s["id"] for s in samples if not s["valid"]],
    }


# ---- format 2: shards ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardRow:
    """Where a sample lies: its shard (position in the dataset's shard list), row group and row."""

    id: int
    shard: int
    group: int
    row: int


class RowGroupCache:
    """Decoded row groups, least recently used first out, at most `max_bytes` (one group always fits)."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes, self.groups, self.bytes = max_bytes, collections.OrderedDict(), 0

    def get(self, key, load):
        if key in self.groups:
            self.groups.move_to_end(key)
            return self.groups[key]
        value = load()
        size = sum(a.nbytes for a in value.values())
        while self.groups and self.bytes + size > self.max_bytes:
            _, old = self.groups.popitem(last=False)
            self.bytes -= sum(a.nbytes for a in old.values())
        self.groups[key] = value
        self.bytes += size
        return value


class ShardedSequenceDataset(SequenceDataset):
    """A split of a format-2 dataset: each sample read from its shard's row group (through the LRU cache)."""

    ARRAYS = ("source", "golden", "text")

    def __init__(self, shards: list[ShardFile], rows: list[ShardRow], *args, cache_bytes: int = CACHE_BYTES,
                 **kwargs):
        super().__init__(rows, *args, **kwargs)
        self.shards, self.cache = shards, RowGroupCache(cache_bytes)

    def _arrays(self, row: ShardRow):
        shard = self.shards[row.shard]
        try:
            arrays = self.cache.get((row.shard, row.group), lambda: shard.read_row_group(row.group, self.ARRAYS))
        except (OSError, ValueError) as e:  # pyarrow's errors are ValueError / OSError subclasses
            raise UserError(f"cannot read {shard.path} row group {row.group}: {e}") from None
        where = f"{shard.path} (sample {row.id})"
        tensors = []
        for name, shape in zip(self.ARRAYS, (self.latent_shape, (self.num_steps, *self.latent_shape),
                                             (self.text_dim,))):
            t = _tensor(arrays[name][row.row])  # the storage dtype
            if tuple(t.shape) != shape:
                raise UserError(f"{where}: {name} has shape {tuple(t.shape)}, expected {shape} from run_config.json")
            if not _finite(t):
                raise UserError(f"{where}: {name} contains NaN or inf values: regenerate this sample")
            tensors.append(t)
        return tuple(tensors)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing a read-only numpy array (Arrow's buffer; nothing writes to it: collate copies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's note on non-writable arrays
        return torch.from_numpy(array)


def shard_rows(shards: list[ShardFile], records: list[dict]) -> list[ShardRow]:
    """Every sample's location, from each shard's id column and row-group sizes (the footers: no array is read)."""
    rows = []
    for k, (shard, record) in enumerate(zip(shards, records)):
        ids = shard.column("id").tolist()
        if len(ids) != int(record["rows"]):
            raise UserError(f"{shard.path} holds {len(ids)} rows, index.json says {record['rows']}")
        meta, row = shard.file.metadata, 0
        for g in range(meta.num_row_groups):
            for j in range(meta.row_group(g).num_rows):
                rows.append(ShardRow(ids[row], k, g, j))
                row += 1
    return rows


# ---- format 1: loose files ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleRow:
    """One metadata row: the sample id and its three tensor files (absolute paths)."""

    id: int
    num_steps: int
    source: Path
    golden: Path
    text: Path

    def files(self) -> dict[str, Path]:
        """{field: path} of the sample's files in the layout's writing order (the golden sequence last)."""
        return {FIELD_OF_COLUMN[c]: getattr(self, FIELD_OF_COLUMN[c]) for c in F.FILE_COLUMNS}


# SampleRow field of each tensor column of metadata.csv
FIELD_OF_COLUMN = {"source_noise_file": "source", "golden_sequence_file": "golden", "text_embedding_file": "text"}


class LooseSequenceDataset(SequenceDataset):
    """A split of a format-1 dataset: each sample's three files loaded (weights only) and checked."""

    def _load(self, path: Path, shape: tuple) -> torch.Tensor:
        try:
            t = load_tensor(path)
        except UserError as e:  # torch's unpickling errors run over several lines: keep the first
            raise UserError(str(e).splitlines()[0]) from None
        if not isinstance(t, torch.Tensor):
            raise UserError(f"{path} holds a {type(t).__name__}, not a tensor: regenerate this sample")
        if tuple(t.shape) != shape:
            raise UserError(f"{path} has shape {tuple(t.shape)}, expected {shape} from run_config.json: "
                            "regenerate this sample or fix the dataset")
        if not t.is_floating_point():
            raise UserError(f"{path} has dtype {t.dtype}, expected a floating-point tensor")
        if not _finite(t):
            raise UserError(f"{path} contains NaN or inf values: regenerate this sample")
        return t

    def _arrays(self, row: SampleRow):
        c, h, w = self.latent_shape
        return (self._load(row.source, (c, h, w)), self._load(row.golden, (self.num_steps, c, h, w)),
                self._load(row.text, (self.text_dim,)))


def read_metadata(dataset_dir: str | Path, num_steps: int) -> list[SampleRow]:
    """Parse format 1's `metadata.csv` into rows sorted by id; a malformed row is an error naming its line."""
    root = Path(dataset_dir)
    path = root / F.METADATA
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"missing {path}: generate the dataset with generate_npd_series.py") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in F.REQUIRED_METADATA if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)} (has: {', '.join(reader.fieldnames or [])})")
    rows, seen = [], set()
    for line, r in enumerate(reader, start=2):
        try:
            sid, n = int(r["id"]), int(r["num_steps"])
        except (TypeError, ValueError):
            raise UserError(f"{path} line {line}: id {r['id']!r} / num_steps {r['num_steps']!r} are not integers") \
                from None
        if sid in seen:
            raise UserError(f"{path} line {line}: duplicate id {sid}")
        if n != num_steps:
            raise UserError(f"{path} line {line}: sample {sid} has num_steps {n} but run_config.json says "
                            f"{num_steps}: one dataset must use one num_steps")
        seen.add(sid)
        rows.append(SampleRow(sid, n, **{FIELD_OF_COLUMN[c]: root / (r[c] or "") for c in F.FILE_COLUMNS}))
    if not rows:
        raise UserError(f"{path} lists no samples: generate some with generate_npd_series.py")
    return sorted(rows, key=lambda row: row.id)


def loose_file_problem(path: Path, min_bytes: int) -> str | None:
    """Why `path` is not an intact torch tensor file holding at least `min_bytes` of tensor data, or None: every
    byte is read (each zip entry's CRC-32 and the pickle, io.tensor_file_problem), nothing unpickled; a full load
    checks the rest (shape, dtype, values)."""
    problem = tensor_file_problem(path)
    if problem:
        return problem
    with zipfile.ZipFile(path) as zf:
        stored = sum(i.file_size for i in zf.infolist() if "/data/" in i.filename)
    if stored < min_bytes:
        return f"holds {stored} bytes of tensor data, fewer than its tensor's {min_bytes}"
    return None


def expected_bytes(run_config: dict) -> dict[str, int]:
    """{SampleRow field: fewest bytes of tensor data its file holds}, from the shapes and storage dtype."""
    c, h, w = (int(s) for s in run_config["latent_shape"])
    dtype = DTYPES.get(str(run_config.get("storage_dtype")), torch.float16)  # float16: the smallest float
    item = torch.empty((), dtype=dtype).element_size()
    n, dim = int(run_config["num_steps"]), int(run_config["text_embedding"]["dim"])
    return {"source": c * h * w * item, "golden": n * c * h * w * item, "text": dim * item}


# ---- opening a dataset --------------------------------------------------------------------------------------

@dataclass
class FileCheck:
    """The verdict on a dataset's files: the good rows, and the files of the dropped ones by reason."""

    good: list
    missing: list[str] = field(default_factory=list)   # files that do not exist
    damaged: list[str] = field(default_factory=list)   # files that exist but fail their check
    bad_ids: list[int] = field(default_factory=list)   # ids of the dropped samples


def verify_files(dataset_dir: str | Path, rows: list[SampleRow], run_config: dict,
                 skip_bad_samples: bool = False) -> FileCheck:
    """Check every file of every format-1 row (`loose_file_problem`): the first bad one is a UserError naming it,
    or with `skip_bad_samples` its sample is dropped and counted."""
    need = expected_bytes(run_config)
    meta = Path(dataset_dir) / F.METADATA
    check = FileCheck(good=[])
    for row in rows:
        verdicts = [(path, loose_file_problem(path, need[name])) for name, path in row.files().items()]
        problems = [(path, why) for path, why in verdicts if why]
        if not problems:
            check.good.append(row)
            continue
        path, why = problems[0]
        if not skip_bad_samples:
            if why == "missing":
                raise UserError(f"missing file {path} (sample {row.id} of {meta}): regenerate the dataset (rerun "
                                "generate_npd_series.py) or pass --skip_bad_samples")
            raise UserError(f"{path} {why} (sample {row.id} of {meta}): delete it and rerun generate_npd_series.py "
                            "to regenerate the sample, or pass --skip_bad_samples")
        check.bad_ids.append(row.id)
        for p, why in problems:
            (check.missing if why == "missing" else check.damaged).append(str(p))
    if check.bad_ids:
        logger.warning("skipping %d sample(s) with missing or damaged files, e.g. %s", len(check.bad_ids),
                       (check.missing + check.damaged)[0])
    return check


def read_shard_index(dataset_dir: str | Path, run_config: dict) -> dict:
    """A format-2 dataset's index.json, checked against its run_config (complete, same run)."""
    root = Path(dataset_dir)
    index = F.read_index(root)
    if index is None:
        total = F.num_shards(int(run_config["num_prompts"]), int(run_config["sharding"]["samples_per_shard"]))
        sealed = len(sealed_records(root, range(total)))
        raise UserError(f"{root} has no {F.INDEX}: the dataset is incomplete ({sealed} of {total} shards sealed); "
                        "rerun generate_npd_series.py (every --shard_index) to finish it, or --finalize it")
    keys = index.get("run_keys") or []
    if keys and F.run_fingerprint(run_config, keys) != index.get("run_fingerprint"):
        raise UserError(f"{root / F.RUN_CONFIG} does not match {root / F.INDEX} (another run's settings): "
                        "regenerate the dataset, or restore the run_config.json it was written with")
    return index


def verify_shard_files(dataset_dir: str | Path, index: dict, skip_bad_samples: bool = False) -> FileCheck:
    """Check every shard's size and sha256 against the index (reads every byte once; the time is logged): a bad
    shard is a UserError naming it, or with `skip_bad_samples` its samples are dropped and counted."""
    root = Path(dataset_dir)
    start = time.perf_counter()
    bad = verify_shards(root, index["shards"])
    seconds = time.perf_counter() - start
    gb = sum(int(r["bytes"]) for r in index["shards"]) / 1e9
    logger.info("verified %d shard(s) of %s (%.3g GB) against index.json in %.2f s (%.3g GB/s)",
                len(index["shards"]), root, gb, seconds, gb / seconds if seconds > 0 else float("inf"))
    check = FileCheck(good=[r for r in index["shards"] if all(r is not b for b, _ in bad)])
    for record, why in bad:
        path = root / record["file"]
        if not skip_bad_samples:
            raise UserError(f"{path} {why}: delete it and rerun generate_npd_series.py with the dataset's flags to "
                            "remake that shard, or pass --skip_bad_samples")
        (check.missing if why == "is missing" else check.damaged).append(str(path))
        check.bad_ids.extend(range(int(record["first_id"]), int(record["last_id"]) + 1))
    if bad:
        logger.warning("skipping %d shard(s) that fail their check, e.g. %s", len(bad), root / bad[0][0]["file"])
    return check


@dataclass
class SequenceData:
    """The train and validation datasets of one dataset directory, its run_config, and what was dropped."""

    run_config: dict
    train: SequenceDataset
    validation: SequenceDataset
    missing: list[str]  # files of samples dropped because they do not exist (with skip_bad_samples)
    damaged: list[str] = field(default_factory=list)  # files of samples dropped as damaged
    dropped_ids: list[int] = field(default_factory=list)  # ids of the samples dropped for either reason
    root: Path | None = None  # the local folder read (a hub id's snapshot in the Hugging Face cache)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.run_config["latent_shape"])

    @property
    def text_dim(self) -> int:
        return int(self.run_config["text_embedding"]["dim"])

    def reward_gains(self) -> dict[int, float] | None:
        """{sample id: reward_gain} of a scored dataset, or None when it was not scored."""
        if self.run_config.get("format_version", 1) == F.LOOSE_FORMAT_VERSION:
            with open(self.root / F.METADATA, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f)
                if "reward_gain" not in (reader.fieldnames or []):
                    return None
                return {int(r["id"]): float(r["reward_gain"]) for r in reader}
        if self.run_config.get("scoring") is None:
            return None
        gains = {}
        for shard in self.train.shards:
            gains.update(zip(shard.column("id").tolist(), shard.column("reward_gain").tolist()))
        return gains


def open_dataset(dataset_dir: str | Path, validation_fraction: float = 0.1, max_seq_len: int | None = None,
                 skip_bad_samples: bool = False, return_errors: bool = False,
                 cache_bytes: int = CACHE_BYTES, keep_dtype: bool = False) -> SequenceData:
    """Read run_config (and format 2's index, or format 1's metadata), verify every file of both splits
    (`skip_bad_samples`: drop and count the samples with a bad one), and split train/validation by id.
    `dataset_dir` may be a hub dataset id (dataset.hub.resolve_dataset). `return_errors`, `keep_dtype`: see
    SequenceDataset."""
    root = resolve_dataset(dataset_dir)
    cfg = load_run_config(root)
    n = int(cfg["num_steps"])
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max_seq_len must be at least 1, got {max_seq_len}")
    shape, dim = cfg["latent_shape"], cfg["text_embedding"]["dim"]
    dtype = DTYPES.get(str(cfg.get("storage_dtype")), torch.float16) if keep_dtype else torch.float32
    if cfg.get("format_version", 1) == F.LOOSE_FORMAT_VERSION:
        check = verify_files(root, read_metadata(root, n), cfg, skip_bad_samples)
        make_split = lambda rows: LooseSequenceDataset(rows, shape, dim, n, max_seq_len, return_errors,  # noqa: E731
                                                       dtype)
    else:
        check = verify_shard_files(root, read_shard_index(root, cfg), skip_bad_samples)
        shards = [ShardFile(root / r["file"]) for r in check.good]
        check.good = shard_rows(shards, check.good)
        make_split = lambda rows: ShardedSequenceDataset(  # noqa: E731
            shards, rows, shape, dim, n, max_seq_len, return_errors, dtype, cache_bytes=cache_bytes)
    if not check.good:
        raise UserError(f"no sample of {dataset_dir} is intact")
    by_id = {r.id: r for r in check.good}
    train_ids, val_ids = split_ids(sorted(by_id), validation_fraction)
    data = SequenceData(cfg, make_split([by_id[i] for i in train_ids]), make_split([by_id[i] for i in val_ids]),
                        check.missing, check.damaged, sorted(check.bad_ids), root)
    if not skip_bad_samples:
        data.train.load_sample(0)  # fail fast on a dataset of the wrong shape
    return data


def dataset_fingerprint(dataset_dir: str | Path) -> str:
    """sha256 naming a dataset: its run_config.json (canonical JSON) and what it holds: format 2's index.json (every
    shard's sha256; canonical JSON) or format 1's metadata.csv (every sample's id, prompt, seed and files); the same
    for any process count or resume. A training export records it as the data it was trained on, and the model
    card shows it."""
    root = Path(dataset_dir)
    run_config = F.read_run_config_json(root)
    digest = hashlib.sha256(canonical_json(run_config).encode("utf-8"))
    digest.update(b"\n")
    if run_config.get("format_version", F.LOOSE_FORMAT_VERSION) == F.LOOSE_FORMAT_VERSION:
        digest.update((root / F.METADATA).read_bytes())
    else:
        digest.update(canonical_json(F.read_index(root)).encode("utf-8"))
    return digest.hexdigest()


def golden_change_rms(dataset: SequenceDataset, max_samples: int = 256, skip_bad_samples: bool = False,
                      total: bool = False) -> float:
    """RMS of the per-step golden change x'_k - x'_{k-1} (`total`: of the whole change x'_n - x_T, a one-step
    model's target) over (up to) the first `max_samples` good samples."""
    sum_sq, count = 0.0, 0
    for i in range(min(len(dataset), max_samples)):
        s = dataset[i]
        if not s["valid"]:
            if not skip_bad_samples:
                raise UserError(s["error"])
            continue
        s = as_float(s)
        if total:
            change = s["golden"][-1] - s["source"]  # (C, H, W)
        else:
            change = s["golden"] - torch.cat([s["source"][None], s["golden"][:-1]])  # (n, C, H, W)
        sum_sq += change.double().pow(2).sum().item()
        count += change.numel()
    if count == 0:
        raise UserError("no readable training sample to measure the golden change on")
    rms = math.sqrt(sum_sq / count)
    if not rms > 0:
        raise UserError("the golden sequences of the training set never change (x'_k == x'_{k-1}): "
                        "the dataset is degenerate; regenerate it")
    return rms
