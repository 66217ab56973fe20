"""Stage 1: extract unique, whitespace-normalised prompts from a dataset (hub id or local data) into prompt files."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

from .io import atomic_write_text

from .prompts import normalize_prompt
from .runtime import get_logger

logger = get_logger(__name__)

# A local file's suffix -> the `datasets` packaged builder that reads it, and that builder's options.
LOCAL_BUILDERS = {
    ".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}), ".jsonl": ("json", {}), ".txt": ("text", {}),
}
LOCAL_HELP = "a directory or a .parquet, .csv, .tsv, .json, .jsonl or .txt file"
READ_BATCH = 1000


@dataclass(frozen=True)
class Source:
    """Where the rows come from: the arguments of `datasets.load_dataset` plus a label for messages."""

    label: str
    path: str                      # a packaged builder name ('parquet'), a directory, or a hub id
    data_files: dict | None = None
    config_kwargs: dict = field(default_factory=dict)
    name: str | None = None        # the hub dataset's config (subset)
    revision: str | None = None
    is_hub: bool = False


@dataclass
class ExtractStats:
    """What happened to the rows read: kept, or dropped as empty or duplicate."""

    read: int = 0
    empty: int = 0
    duplicates: int = 0
    kept: int = 0


def _one_line(e: BaseException, limit: int = 300) -> str:
    """The exception (and its cause, which datasets' generic errors hide) as one line of bounded length."""
    text = " ".join(str(e).split()) or type(e).__name__
    if e.__cause__ is not None:
        text += f": {type(e.__cause__).__name__}: {' '.join(str(e.__cause__).split())}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _hub_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    """True for names that can only be a local path (a hub id is 'owner/name' or 'name')."""
    return (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
            or Path(name).suffix.lower() in LOCAL_BUILDERS)


def resolve_source(name: str, split: str, config: str | None = None, revision: str | None = None) -> Source:
    """Turn --dataset_name into a `Source`: a local file (read as `split`), a local directory, or a hub id."""
    path = Path(name).expanduser()
    if path.exists() and revision:
        logger.warning("--revision %s is ignored for local data %s", revision, name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in LOCAL_BUILDERS:
            raise UserError(f"--dataset_name {name}: unsupported file type {suffix or '(no suffix)'}: pass "
                            f"{LOCAL_HELP}, or a hub dataset id")
        if path.stat().st_size == 0:
            raise UserError(f"--dataset_name {name} is an empty file: pass a file with prompts")
        builder, options = LOCAL_BUILDERS[suffix]
        return Source(label=name, path=builder, data_files={split: str(path.resolve())}, config_kwargs=dict(options))
    if path.is_dir():
        return Source(label=name, path=str(path.resolve()), name=config)
    if _looks_like_path(name):
        raise UserError(f"--dataset_name {name}: no such file or directory: pass {LOCAL_HELP}, or a hub dataset id")
    return Source(label=name, path=name, name=config, revision=revision, is_hub=True)


def _cannot_load(source: Source, e: BaseException) -> UserError:
    hint = ""
    if source.is_hub:
        hint = (": HF_HUB_OFFLINE is set, so only datasets already in the local cache load; unset it, or pass "
                f"{LOCAL_HELP}" if _hub_offline() else f": check the id (and --revision), or pass {LOCAL_HELP}")
    return UserError(f"cannot load dataset {source.label!r} ({_one_line(e)}){hint}")


def _load_builder(source: Source, cache_dir: str | None, **config_kwargs):
    """`datasets.load_dataset_builder`: resolves the data files (no download) or fails with a UserError."""
    import datasets

    try:
        return datasets.load_dataset_builder(source.path, source.name, data_files=source.data_files,
                                             revision=source.revision, cache_dir=cache_dir,
                                             **source.config_kwargs, **config_kwargs)
    except Exception as e:  # not found, offline, gated, no data files, bad config: all a problem with the input
        raise _cannot_load(source, e) from None


def _parquet_schema_features(url: str):
    """The features of a parquet file read from its footer only (local path or hf:// URL), or None."""
    import datasets
    import fsspec
    import pyarrow.parquet as pq

    try:
        with fsspec.open(url, "rb") as f:
            return datasets.Features.from_arrow_schema(pq.read_schema(f))
    except Exception as e:  # unreadable here: the columns are checked after loading instead
        logger.debug("cannot read the parquet schema of %s: %s", url, e)
        return None


def _known_features(builder, split: str):
    """The split's features before anything is downloaded, when the card or a parquet footer tells; else None."""
    if builder.info.features is not None:
        return builder.info.features
    files = (builder.config.data_files or {}).get(split) or []
    if builder.name == "parquet" and files:
        return _parquet_schema_features(str(files[0]))
    return None


def choose_column(columns: Iterable[str], requested: str, builder_name: str, label: str) -> str:
    """The prompt column: `requested`, or 'text' for a text dataset (a .txt file) that lacks it."""
    columns = list(columns)
    if requested in columns:
        return requested
    if builder_name == "text" and "text" in columns:
        logger.info("%s is a text dataset without a %r column: reading its 'text' column (one prompt per line)",
                    label, requested)
        return "text"
    raise UserError(f"{label} has no column {requested!r} (columns: {', '.join(columns) or 'none'}): "
                    "pass --prompt_column")


def _check_text(features, column: str, label: str) -> None:
    import datasets

    feature = features[column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise UserError(f"column {column!r} of {label} holds {feature}, not text: pass the prompt column with "
                        "--prompt_column")


def open_prompt_column(source: Source, split: str, column: str, streaming: bool, cache_dir: str | None = None):
    """Load `split` of `source` keeping only the prompt column; returns (dataset, column).

    Parquet reads only that column (`columns=[column]`), so image bytes beside the captions are never read;
    with `streaming` nothing is downloaded up front.
    """
    import datasets

    builder = _load_builder(source, cache_dir)
    splits = [str(s) for s in (builder.config.data_files or {})]
    if splits and split not in splits:
        raise UserError(f"{source.label} has no split {split!r} (splits: {', '.join(splits)}): pass --split")
    features = _known_features(builder, split)
    config_kwargs = dict(source.config_kwargs)
    if features is not None:
        column = choose_column(features, column, builder.name, source.label)
        _check_text(features, column, source.label)
        if "columns" in {f.name for f in fields(builder.config)}:
            config_kwargs["columns"] = [column]
    if source.is_hub and not streaming:
        logger.warning("reading hub dataset %s without --streaming downloads all its data files first; "
                       "pass --streaming to read only the prompt column", source.label)
    try:
        ds = datasets.load_dataset(source.path, source.name, data_files=source.data_files, split=split,
                                   revision=source.revision, cache_dir=cache_dir, streaming=streaming,
                                   **config_kwargs)
    except (datasets.exceptions.DatasetsError, OSError, ValueError) as e:
        raise _cannot_load(source, e) from None
    if features is None and ds.features is not None:
        column = choose_column(ds.features, column, builder.name, source.label)
        _check_text(ds.features, column, source.label)
    elif features is None:  # a streamed csv/json/text file: its columns show in the first row (values checked later)
        first = next(iter(ds.take(1)), None)
        if first is None:
            raise UserError(f"{source.label} split {split!r} holds no rows: pass a dataset with prompts")
        column = choose_column(first, column, builder.name, source.label)
    return ds.select_columns([column]), column


def _num_rows(ds, split: str) -> int | None:
    """Rows in the split: exact for a loaded dataset, from the dataset card (if any) when streaming."""
    if hasattr(ds, "__len__"):
        return len(ds)
    info = (ds.info.splits or {}).get(split)
    return info.num_examples if info is not None and info.num_examples else None


def iter_prompts(ds, column: str, label: str, total: int | None = None) -> Iterator[str | None]:
    """Yield the raw values of `column`, batch by batch, with a progress bar over rows."""
    from tqdm.auto import tqdm

    with tqdm(total=total, unit=" rows", desc="Reading prompts", dynamic_ncols=True) as bar:
        for batch in ds.iter(batch_size=READ_BATCH):
            values = batch[column]
            bar.update(len(values))
            for value in values:
                if value is not None and not isinstance(value, str):
                    raise UserError(f"column {column!r} of {label} holds {type(value).__name__} values, not text: "
                                    "pass the prompt column with --prompt_column")
                yield value


def collect_prompts(values: Iterable[str | None], limit: int | None = None) -> tuple[list[str], ExtractStats]:
    """Normalise whitespace and keep the first occurrence of each non-empty prompt, stopping at `limit` kept."""
    stats, seen, kept = ExtractStats(), set(), []
    if limit is not None and limit <= 0:
        return kept, stats
    for value in values:
        stats.read += 1
        text = normalize_prompt(value or "")
        if not text:
            stats.empty += 1
        elif text in seen:
            stats.duplicates += 1
        else:
            seen.add(text)
            kept.append(text)
            if limit is not None and len(kept) >= limit:
                break
    stats.kept = len(kept)
    return kept, stats


def split_test(prompts: list[str], test_size: int | None) -> tuple[list[str], list[str]]:
    """(main, test): the first `test_size` prompts form the test set, the rest the main set; disjoint."""
    if not test_size:
        return prompts, []
    if len(prompts) <= test_size:
        raise UserError(f"only {len(prompts)} unique prompts found, but --test_size {test_size} needs more "
                        "(the main file must keep at least one): lower --test_size")
    return prompts[test_size:], prompts[:test_size]


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value <= 0:
        raise UserError(f"{flag} must be a positive integer, got {value}")


def extract_prompts(dataset_name: str, output_dir: str | os.PathLike, output_filename: str = "prompts.txt", *,
                    split: str = "train", prompt_column: str = "caption", dataset_config: str | None = None,
                    revision: str | None = None, streaming: bool = False, max_prompts: int | None = None,
                    seed: int | None = None, shuffle_buffer_size: int = 10_000, test_size: int | None = None,
                    test_filename: str = "test_prompts.txt", cache_dir: str | None = None) -> ExtractStats:
    """Read a dataset's prompt column and write its unique prompts (and an optional disjoint test file)."""
    _positive(max_prompts, "--max_prompts")
    _positive(test_size, "--test_size")
    _positive(shuffle_buffer_size, "--shuffle_buffer_size")
    if not re.fullmatch(r"\w+(\.\w+)*", split):
        raise UserError(f"--split {split!r} is not a split name (like train or validation_unique)")
    output_path = Path(output_dir) / output_filename
    test_path = Path(output_dir) / test_filename if test_size else None
    if test_path is not None and test_path.resolve() == output_path.resolve():
        raise UserError(f"--test_filename and --output_filename both name {output_path}: give them different names")

    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a directory: pass a directory")
    source = resolve_source(dataset_name, split, dataset_config, revision)
    import datasets  # after the cheap checks: importing it takes a second

    ds, column = open_prompt_column(source, split, prompt_column, streaming, cache_dir)
    if seed is not None:
        if streaming:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        else:
            ds = ds.shuffle(seed=seed, keep_in_memory=True)
    limit = None if max_prompts is None else max_prompts + (test_size or 0)
    logger.info("Reading %s split %r column %r%s%s", source.label, split, column, " (streaming)" if streaming else "",
                f", shuffled with seed {seed}" if seed is not None else "")
    try:
        prompts, stats = collect_prompts(iter_prompts(ds, column, source.label, _num_rows(ds, split)), limit)
    except (OSError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"reading {source.label} failed ({_one_line(e)}): rerun, or check the data") from None
    if not prompts:
        raise UserError(f"column {column!r} of {source.label} split {split!r} holds no non-empty prompts "
                        f"({stats.read} rows read)")
    main, test = split_test(prompts, test_size)
    if max_prompts is not None and len(main) < max_prompts:
        logger.warning("only %d unique prompts available for %s, fewer than --max_prompts %d",
                       len(main), output_path.name, max_prompts)
    if test_path is not None:
        atomic_write_text(test_path, "".join(p + "\n" for p in test))
    atomic_write_text(output_path, "".join(p + "\n" for p in main))
    written = f"{len(main)} to {output_path}" + (f" and {len(test)} to {test_path}" if test_path else "")
    logger.info("Read %d rows: kept %d unique prompts (%s); dropped %d empty and %d duplicates%s", stats.read,
                stats.kept, written, stats.empty, stats.duplicates,
                "; stopped at --max_prompts" if limit is not None and stats.kept >= limit else "")
    return stats
