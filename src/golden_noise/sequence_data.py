"""The golden-noise sequence dataset written by stage 2, read for training (stage 3).

The file layout is golden_noise.layout's: `metadata.csv` lists complete samples; `run_config.json` says the
latent shape, the number of golden steps, the storage dtype and the text-embedding size. Before training every
listed file is verified from its size and zip directory (cheap: no tensor is read), and every tensor is checked
against run_config.json when loaded.
"""
from __future__ import annotations

import csv
import hashlib
import io
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from . import layout
from .errors import UserError, one_line
from .io import load_tensor
from .runtime import DTYPES, get_logger

logger = get_logger(__name__)


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
        return {FIELD_OF_COLUMN[c]: getattr(self, FIELD_OF_COLUMN[c]) for c in layout.FILE_COLUMNS}


# SampleRow field of each tensor column of metadata.csv
FIELD_OF_COLUMN = {"source_noise_file": "source", "golden_sequence_file": "golden", "text_embedding_file": "text"}


def load_run_config(dataset_dir: str | Path) -> dict:
    """Read and check `run_config.json` (latent_shape, num_steps, text_embedding.dim)."""
    path = Path(dataset_dir) / layout.RUN_CONFIG
    if not Path(dataset_dir).is_dir():
        raise UserError(f"dataset directory {dataset_dir} does not exist: pass the --output_dir of "
                        "generate_npd_series.py as --dataset_dir")
    try:
        cfg = layout.read_run_config_json(dataset_dir)
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
    if cfg.get("format_version", 1) != layout.FORMAT_VERSION:
        raise UserError(f"{path} has format_version {cfg.get('format_version')}; this code reads version "
                        f"{layout.FORMAT_VERSION}")
    return cfg


def read_metadata(dataset_dir: str | Path, num_steps: int) -> list[SampleRow]:
    """Parse `metadata.csv` into rows sorted by id; a malformed row is an error naming its line."""
    root = Path(dataset_dir)
    path = root / layout.METADATA
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"missing {path}: generate the dataset with generate_npd_series.py") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in layout.REQUIRED_METADATA if c not in (reader.fieldnames or [])]
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
        rows.append(SampleRow(sid, n, **{FIELD_OF_COLUMN[c]: root / (r[c] or "") for c in layout.FILE_COLUMNS}))
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


def tensor_file_problem(path: Path, min_bytes: int) -> str | None:
    """Why `path` is not a complete torch tensor file holding at least `min_bytes` of tensor data, or None.

    Reads only the file's size and its zip directory (at the end of the file: a truncated file has none), so it
    costs microseconds however large the tensor; a full load checks the rest (shape, dtype, values)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be read ({one_line(e)})"
    if size < min_bytes:
        return f"has {size} bytes, fewer than its tensor's {min_bytes}: truncated"
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        return f"is not a complete torch tensor file ({one_line(e)}): truncated or corrupt"
    if not any(i.filename.endswith("/data.pkl") for i in infos):
        return "is not a torch tensor file (its zip lacks data.pkl)"
    stored = sum(i.file_size for i in infos if "/data/" in i.filename)
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


@dataclass
class FileCheck:
    """The verdict on a dataset's files: the good rows, and the files of the dropped ones by reason."""

    good: list[SampleRow]
    missing: list[str] = field(default_factory=list)   # files that do not exist
    damaged: list[str] = field(default_factory=list)   # files that exist but are truncated or not tensor files
    bad_ids: list[int] = field(default_factory=list)   # ids of the dropped samples


def verify_files(dataset_dir: str | Path, rows: list[SampleRow], run_config: dict,
                 skip_bad_samples: bool = False) -> FileCheck:
    """Check every file of every row (tensor_file_problem): the first bad one is a UserError naming it, or with
    `skip_bad_samples` its sample is dropped and counted."""
    need = expected_bytes(run_config)
    meta = Path(dataset_dir) / layout.METADATA
    check = FileCheck(good=[])
    for row in rows:
        verdicts = [(path, tensor_file_problem(path, need[name])) for name, path in row.files().items()]
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


@dataclass
class SequenceData:
    """The train and validation datasets of one dataset directory, its run_config, and what was dropped."""

    run_config: dict
    train: SequenceDataset
    validation: SequenceDataset
    missing: list[str]  # files of samples dropped because they do not exist (with skip_bad_samples)
    damaged: list[str] = field(default_factory=list)  # files of samples dropped as truncated or corrupt
    dropped_ids: list[int] = field(default_factory=list)  # ids of the samples dropped for either reason

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.run_config["latent_shape"])

    @property
    def text_dim(self) -> int:
        return int(self.run_config["text_embedding"]["dim"])


def open_dataset(dataset_dir: str | Path, validation_fraction: float = 0.1, max_seq_len: int | None = None,
                 skip_bad_samples: bool = False, return_errors: bool = False) -> SequenceData:
    """Read run_config + metadata, verify every listed file of both splits (`verify_files`; `skip_bad_samples`:
    drop and count the samples with a bad one), and split train/validation by id. `return_errors`: see
    SequenceDataset."""
    cfg = load_run_config(dataset_dir)
    n = int(cfg["num_steps"])
    if max_seq_len is not None and max_seq_len < 1:
        raise UserError(f"--max_seq_len must be at least 1, got {max_seq_len}")
    rows = read_metadata(dataset_dir, n)
    check = verify_files(dataset_dir, rows, cfg, skip_bad_samples)
    if not check.good:
        raise UserError(f"no sample of {dataset_dir} has all its files intact")
    train_ids, val_ids = split_ids([r.id for r in check.good], validation_fraction)
    by_id = {r.id: r for r in check.good}
    make = lambda ids: SequenceDataset([by_id[i] for i in ids], cfg["latent_shape"],  # noqa: E731
                                       cfg["text_embedding"]["dim"], max_seq_len, return_errors)
    data = SequenceData(cfg, make(train_ids), make(val_ids), check.missing, check.damaged, check.bad_ids)
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


def dataset_fingerprint(dataset_dir: str | Path) -> str:
    """sha256 naming a dataset: its run_config.json (canonical JSON) and metadata.csv (every sample's id, prompt,
    seed and files; the same for any process count or resume). A training export records it as the data it was
    trained on, and the model card shows it."""
    from .export import canonical_json

    root = Path(dataset_dir)
    digest = hashlib.sha256(canonical_json(layout.read_run_config_json(root)).encode("utf-8"))
    digest.update(b"\n")
    digest.update((root / layout.METADATA).read_bytes())
    return digest.hexdigest()
