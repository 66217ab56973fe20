"""Stage 1: unique, whitespace-normalised prompts from a dataset (hub id or local data) into prompt files: the
training prompts with an optional held-out part (`extract_prompts`), or a test file that excludes every prompt of a
training file (`write_held_out_prompts`). Both read through the same code."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Collection, Iterable, Iterator

from .errors import UserError, one_line
from .io import atomic_write_text, looks_local
from .prompts import normalize_prompt, read_prompts
from .runs import check_writable_dir
from .runtime import get_logger

logger = get_logger(__name__)

# A local file's suffix -> the `datasets` packaged builder that reads it, and that builder's options.
LOCAL_BUILDERS = {
    ".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"sep": "\t"}),
    ".json": ("json", {}), ".jsonl": ("json", {}), ".txt": ("text", {}),
}
LOCAL_HELP = "a directory or a .parquet, .csv, .tsv, .json, .jsonl or .txt file"
READ_BATCH = 1000
DATASET_HELP = ("a hub dataset id (e.g. yuvalkirstain/pickapic_v1), or local data: a directory, or a .parquet, .csv, "
                ".tsv, .json, .jsonl or .txt file (a .txt file is one prompt per line)")


@dataclass
class PromptSource:
    """Which prompts to read and how: a dataset's split and column (the stage-1 CLIs' flags come from these fields)."""

    dataset_name: str = field(default="yuvalkirstain/pickapic_v1", metadata={"help": DATASET_HELP})
    dataset_config: str | None = field(default=None, metadata={
        "help": "the hub dataset's config (subset) name, if it has several"})
    split: str = field(default="train", metadata={
        "help": "dataset split to read (a single local file is read as this split)"})
    prompt_column: str = field(default="caption", metadata={
        "help": "column holding the prompts; a text dataset without it uses its 'text' column"})
    revision: str | None = field(default=None, metadata={
        "help": "hub dataset revision (branch, tag or commit); hub ids only"})
    streaming: bool = field(default=False, metadata={
        "help": "stream the rows instead of downloading the dataset first; only the prompt column is read, so "
                "Pick-a-Pic's image bytes are never downloaded"})
    seed: int | None = field(default=None, metadata={
        "help": "shuffle the rows with this seed before taking prompts (None: keep the dataset order); with "
                "--streaming, shuffles shards and a buffer of --shuffle_buffer_size rows"})
    shuffle_buffer_size: int = field(default=10_000, metadata={
        "help": "rows in the shuffle buffer with --streaming and --seed"})
    cache_dir: str | None = field(default=None, metadata={
        "help": "datasets cache directory (None: HF_DATASETS_CACHE)"})


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
    excluded: int = 0  # prompts of the training file (write_held_out_prompts)
    kept: int = 0


def _with_cause(e: BaseException) -> str:
    """The exception and its cause (which datasets' generic errors hide), each as errors.one_line."""
    return one_line(e) + (f": {one_line(e.__cause__)}" if e.__cause__ is not None else "")


def _hub_offline() -> bool:
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE)


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
    if looks_local(name, tuple(LOCAL_BUILDERS)):
        raise UserError(f"--dataset_name {name}: no such file or directory: pass {LOCAL_HELP}, or a hub dataset id")
    return Source(label=name, path=name, name=config, revision=revision, is_hub=True)


def _cannot_load(source: Source, e: BaseException) -> UserError:
    hint = ""
    if source.is_hub:
        hint = (": HF_HUB_OFFLINE is set, so only datasets already in the local cache load; unset it, or pass "
                f"{LOCAL_HELP}" if _hub_offline() else f": check the id (and --revision), or pass {LOCAL_HELP}")
    return UserError(f"cannot load dataset {source.label!r} ({_with_cause(e)}){hint}")


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


def collect_prompts(values: Iterable[str | None], limit: int | None = None,
                    exclude: Collection[str] = frozenset()) -> tuple[list[str], ExtractStats]:
    """Normalise whitespace and keep the first occurrence of each non-empty prompt not in `exclude` (normalised
    texts), stopping at `limit` kept."""
    stats, seen, kept = ExtractStats(), set(), []
    if limit is not None and limit <= 0:
        return kept, stats
    for value in values:
        stats.read += 1
        text = normalize_prompt(value or "")
        if not text:
            stats.empty += 1
        elif text in exclude:
            stats.excluded += 1
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


def check_source(source: PromptSource) -> None:
    """The checks of a `PromptSource` that need no data: a UserError naming the flag."""
    _positive(source.shuffle_buffer_size, "--shuffle_buffer_size")
    if not re.fullmatch(r"\w+(\.\w+)*", source.split):
        raise UserError(f"--split {source.split!r} is not a split name (like train or validation_unique)")


def read_unique_prompts(source: PromptSource, limit: int | None = None,
                        exclude: Collection[str] = frozenset()) -> tuple[list[str], ExtractStats]:
    """Read the unique normalised prompts of `source` (shuffled with its seed) that are not in `exclude`, up to
    `limit`; a UserError when none are found."""
    resolved = resolve_source(source.dataset_name, source.split, source.dataset_config, source.revision)
    import datasets  # after the cheap checks: importing it takes a second

    ds, column = open_prompt_column(resolved, source.split, source.prompt_column, source.streaming, source.cache_dir)
    if source.seed is not None:
        if source.streaming:
            ds = ds.shuffle(seed=source.seed, buffer_size=source.shuffle_buffer_size)
        else:
            ds = ds.shuffle(seed=source.seed, keep_in_memory=True)
    logger.info("Reading %s split %r column %r%s%s", resolved.label, source.split, column,
                " (streaming)" if source.streaming else "",
                f", shuffled with seed {source.seed}" if source.seed is not None else "")
    try:
        rows = iter_prompts(ds, column, resolved.label, _num_rows(ds, source.split))
        prompts, stats = collect_prompts(rows, limit, exclude)
    except (OSError, datasets.exceptions.DatasetsError) as e:
        raise UserError(f"reading {resolved.label} failed ({_with_cause(e)}): rerun, or check the data") from None
    if not prompts:
        outside = f" outside the training --prompt_file ({stats.excluded} were in it)" if exclude else ""
        raise UserError(f"column {column!r} of {resolved.label} split {source.split!r} holds no non-empty prompts"
                        f"{outside} ({stats.read} rows read)")
    return prompts, stats


def extract_prompts(source: PromptSource, output_dir: str | os.PathLike, output_filename: str = "prompts.txt", *,
                    max_prompts: int | None = None, test_size: int | None = None,
                    test_filename: str = "test_prompts.txt") -> ExtractStats:
    """Read a dataset's prompt column and write its unique prompts (and an optional disjoint test file)."""
    _positive(max_prompts, "--max_prompts")
    _positive(test_size, "--test_size")
    check_source(source)
    output_path = Path(output_dir) / output_filename
    test_path = Path(output_dir) / test_filename if test_size else None
    if test_path is not None and test_path.resolve() == output_path.resolve():
        raise UserError(f"--test_filename and --output_filename both name {output_path}: give them different names")
    check_writable_dir(output_dir, "--output_dir")  # before any prompt is read
    limit = None if max_prompts is None else max_prompts + (test_size or 0)
    prompts, stats = read_unique_prompts(source, limit)
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


def write_held_out_prompts(source: PromptSource, prompt_file: str | os.PathLike, output: str | os.PathLike,
                           num_prompts: int = 500) -> ExtractStats:
    """Write up to `num_prompts` unique prompts of `source` to `output`, leaving out every prompt of the training
    `prompt_file` (compared as normalised text): a test file disjoint from the training prompts."""
    _positive(num_prompts, "--num_prompts")
    check_source(source)
    output = Path(output)
    for other, flag in ((prompt_file, "--prompt_file"), (source.dataset_name, "--dataset_name")):
        if output.resolve() == Path(other).expanduser().resolve():
            raise UserError(f"--output {output} is also the {flag}: write the test prompts to another file")
    if output.is_dir():
        raise UserError(f"--output {output} is a folder: pass a file path such as {output / 'test_prompts.txt'}")
    check_writable_dir(output.parent, "--output")  # before any prompt is read
    training = {p.text for p in read_prompts(prompt_file)}
    prompts, stats = read_unique_prompts(source, num_prompts, exclude=training)
    if len(prompts) < num_prompts:
        logger.warning("only %d prompts outside %s found, fewer than --num_prompts %d", len(prompts), prompt_file,
                       num_prompts)
    atomic_write_text(output, "".join(p + "\n" for p in prompts))
    logger.info("Read %d rows: wrote %d test prompts to %s; dropped %d empty, %d duplicates and %d prompts of the "
                "training file %s", stats.read, len(prompts), output, stats.empty, stats.duplicates, stats.excluded,
                prompt_file)
    return stats
