"""The golden-noise sequence dataset written by stage 2, read for training (stage 3).

`<dataset_dir>/metadata.csv` lists complete samples; `run_config.json` says the latent shape, the number of
golden steps and the text-embedding size, and every tensor is checked against it when loaded.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from .errors import UserError

from .io import load_tensor
from .runtime import get_logger

logger = get_logger(__name__)

METADATA_COLUMNS = ("id", "num_steps", "source_noise_file", "golden_sequence_file", "text_embedding_file")
FILE_COLUMNS = ("source_noise_file", "golden_sequence_file", "text_embedding_file")


@dataclass(frozen=True)
class SampleRow:
    """One metadata row: the sample id and its three tensor files (absolute paths)."""

    id: int
    num_steps: int
    source: Path
    golden: Path
    text: Path


def load_run_config(dataset_dir: str | Path) -> dict:
    """Read and check `run_config.json` (latent_shape, num_steps, text_embedding.dim)."""
    path = Path(dataset_dir) / "run_config.json"
    if not Path(dataset_dir).is_dir():
        raise UserError(f"dataset directory {dataset_dir} does not exist: pass the --output_dir of "
                        "generate_npd_series.py as --dataset_dir")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
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
    if cfg.get("format_version", 1) != 1:
        raise UserError(f"{path} has format_version {cfg.get('format_version')}; this code reads version 1")
    return cfg


def read_metadata(dataset_dir: str | Path, num_steps: int) -> list[SampleRow]:
    """Parse `metadata.csv` into rows sorted by id; a malformed row is an error naming its line."""
    root = Path(dataset_dir)
    path = root / "metadata.csv"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"missing {path}: generate the dataset with generate_npd_series.py") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in METADATA_COLUMNS if c not in (reader.fieldnames or [])]
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
        rows.append(SampleRow(sid, n, *(root / (r[c] or "") for c in FILE_COLUMNS)))
    if not rows:
        raise UserError(f"{path} lists no samples: generate some with generate_npd_series.py")
    return sorted(rows, key=lambda row: row.id)


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


class SequenceDataset(Dataset):
    """Samples {id, source (C, H, W), golden (n, C, H, W), text (P,), valid, error} as float32 tensors.

    A file that cannot be read or has the wrong shape raises a UserError naming it; with `return_errors`
    the sample comes back zero-filled with valid=False and the error string instead (from a loader worker
    too), so the training loop can stop every process with that message, or skip the sample while batch
    shapes (and every process's step count) stay fixed and the loss ignores it.
    """

    def __init__(self, rows: list[SampleRow], latent_shape, text_dim: int, max_seq_len: int | None = None,
                 return_errors: bool = False):
        self.rows = list(rows)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.text_dim = int(text_dim)
        self.num_steps = self.rows[0].num_steps if self.rows else 0
        self.seq_len = min(self.num_steps, max_seq_len) if max_seq_len else self.num_steps
        self.return_errors = return_errors

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def ids(self) -> list[int]:
        return [r.id for r in self.rows]

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
        # A sum is NaN/inf iff an element is (finite values cannot overflow these accumulators): 40x cheaper
        # than an elementwise isfinite, which would dominate the loading time.
        acc = torch.float32 if t.dtype == torch.float16 else torch.float64
        if not torch.isfinite(t.sum(dtype=acc)):
            raise UserError(f"{path} contains NaN or inf values: regenerate this sample")
        return t.float()

    def load_sample(self, i: int) -> dict:
        """Load and check sample i (raises UserError on a bad file)."""
        row = self.rows[i]
        c, h, w = self.latent_shape
        source = self._load(row.source, (c, h, w))  # (C, H, W)
        golden = self._load(row.golden, (self.num_steps, c, h, w))[: self.seq_len]  # (n, C, H, W)
        text = self._load(row.text, (self.text_dim,))  # (P,)
        return {"id": row.id, "source": source, "golden": golden, "text": text, "valid": True, "error": ""}

    def __getitem__(self, i: int) -> dict:
        try:
            return self.load_sample(i)
        except UserError as e:
            if not self.return_errors:
                raise
            c, h, w = self.latent_shape
            return {"id": self.rows[i].id, "source": torch.zeros(c, h, w),
                    "golden": torch.zeros(self.seq_len, c, h, w), "text": torch.zeros(self.text_dim),
                    "valid": False, "error": str(e)}


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


@dataclass
class SequenceData:
    """The train and validation datasets of one dataset directory, its run_config, and what was dropped."""

    run_config: dict
    train: SequenceDataset
    validation: SequenceDataset
    missing: list[str]  # files of samples dropped because they do not exist (with skip_bad_samples)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.run_config["latent_shape"])

    @property
    def text_dim(self) -> int:
        return int(self.run_config["text_embedding"]["dim"])


def open_dataset(dataset_dir: str | Path, validation_fraction: float = 0.1, max_seq_len: int | None = None,
                 skip_bad_samples: bool = False, return_errors: bool = False) -> SequenceData:
    """Read run_config + metadata, check that every listed file exists (`skip_bad_samples`: drop and count
    the samples that lack one), and split train/validation by id. `return_errors`: see SequenceDataset."""
    cfg = load_run_config(dataset_dir)
    n = int(cfg["num_steps"])
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max_seq_len must be at least 1, got {max_seq_len}")
    rows = read_metadata(dataset_dir, n)
    good, missing = [], []
    for row in rows:
        absent = [str(p) for p in (row.source, row.golden, row.text) if not p.is_file()]
        if not absent:
            good.append(row)
            continue
        if not skip_bad_samples:
            raise UserError(f"missing file {absent[0]} (sample {row.id} of {Path(dataset_dir) / 'metadata.csv'}): "
                            "regenerate the dataset or pass --skip_bad_samples")
        missing.extend(absent)
    if missing:
        logger.warning("skipping %d sample(s) with missing files, e.g. %s", len(rows) - len(good), missing[0])
    if not good:
        raise UserError(f"no sample of {dataset_dir} has all its files")
    train_ids, val_ids = split_ids([r.id for r in good], validation_fraction)
    by_id = {r.id: r for r in good}
    make = lambda ids: SequenceDataset([by_id[i] for i in ids], cfg["latent_shape"],  # noqa: E731
                                       cfg["text_embedding"]["dim"], max_seq_len, return_errors)
    data = SequenceData(cfg, make(train_ids), make(val_ids), missing)
    if not skip_bad_samples:
        data.train.load_sample(0)  # fail fast on a dataset of the wrong shape
    return data


def golden_change_rms(dataset: SequenceDataset, max_samples: int = 256, skip_bad_samples: bool = False) -> float:
    """RMS of the per-step golden change x'_k - x'_{k-1} over (up to) the first `max_samples` good samples."""
    total, count = 0.0, 0
    for i in range(min(len(dataset), max_samples)):
        s = dataset[i]
        if not s["valid"]:
            if not skip_bad_samples:
                raise UserError(s["error"])
            continue
        prev = torch.cat([s["source"][None], s["golden"][:-1]])  # (n, C, H, W)
        total += (s["golden"] - prev).double().pow(2).sum().item()
        count += s["golden"].numel()
    if count == 0:
        raise UserError("no readable training sample to measure the golden change on")
    rms = math.sqrt(total / count)
    if not rms > 0:
        raise UserError("the golden sequences of the training set never change (x'_k == x'_{k-1}): "
                        "the dataset is degenerate; regenerate it")
    return rms
