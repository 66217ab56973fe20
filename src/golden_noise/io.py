"""File I/O shared by every stage: user errors, atomic writes, prompt files."""
from __future__ import annotations

import csv
import errno
import io
import json
import os
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line and exit code 2."""


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else delete it.

    Readers never see a half-written file: `os.replace` is atomic within one filesystem.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"no space left on device while writing {path}: free some space and rerun "
                            "(finished work is kept)") from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically (tensors and plain containers only; loaded with weights_only).

    Serialised through memory: torch.save names the zip's root folder after the file it writes, so saving to
    a temporary name directly would make equal tensors give different bytes."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())


def atomic_save_image(image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically; the format comes from `path`'s suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def load_tensor(path: str | os.PathLike):
    """Load a tensor file written by this project, never executing pickled code."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"missing file {path}") from None
    except Exception as e:  # truncated, corrupt or not a tensor file
        raise UserError(f"cannot read tensor file {path}: {type(e).__name__}: {e}") from None


def normalize_prompt(text: str) -> str:
    """Collapse runs of whitespace (newlines, tabs) into single spaces and strip the ends."""
    return " ".join(text.split())


@dataclass(frozen=True)
class Prompt:
    """A prompt and its index: its 0-based line (txt) or row (csv) number in the prompt file."""

    index: int
    text: str


def read_prompts(path: str | os.PathLike, column: str | None = None) -> list[Prompt]:
    """Read a prompt file: `.txt` (one prompt per line) or `.csv`/`.tsv` (the `column`, default 'prompt'
    or 'caption'). Blank prompts are skipped but keep their index, so later stages stay aligned."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist: pass an existing --prompt_file")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} line {number} is not valid UTF-8 ({e.reason} at byte {e.start}): "
                            "re-encode the file as UTF-8") from None
    text = raw.decode("utf-8-sig")
    if path.suffix.lower() in (".csv", ".tsv"):
        prompts = _read_table(path, text, column, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        prompts = [Prompt(i, normalize_prompt(line)) for i, line in enumerate(text.split("\n"))]
    prompts = [p for p in prompts if p.text]
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts: write one prompt per line")
    return prompts


def _read_table(path: Path, text: str, column: str | None, delimiter: str) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    fields = reader.fieldnames or []
    if column is None:
        column = next((c for c in ("prompt", "caption", "text") if c in fields), None)
    if column not in fields:
        raise UserError(f"{path} has no column {column!r} (columns: {', '.join(fields) or 'none'}): "
                        "pass --prompt_column")
    return [Prompt(i, normalize_prompt(row[column] or "")) for i, row in enumerate(reader)]
