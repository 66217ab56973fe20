"""Prompt files: one prompt per line (or a .csv/.tsv column); a prompt's index is its 0-based line number."""
from __future__ import annotations

import csv
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import UserError


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


def prompt_fingerprint(prompts: Iterable[Prompt]) -> str:
    """sha256 of the (index, text) pairs: two prompt lists with the same fingerprint give the same outputs."""
    h = hashlib.sha256()
    for p in prompts:
        h.update(f"{p.index}\t{p.text}\n".encode("utf-8"))
    return h.hexdigest()
