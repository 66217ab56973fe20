"""File I/O shared by every stage: atomic writes and safe tensor loading."""
from __future__ import annotations

import errno
import io
import json
import os
import re
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError, one_line


_TEMP_NAME = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")  # atomic_path's temporary files: .{name}.{pid}.{hex8}.tmp


def remove_stale_temps(folders) -> int:
    """Delete the temporary files atomic_path's writers left in `folders` when they were killed (any other file,
    hidden or not, is left alone); returns how many."""
    stale = [p for d in map(Path, folders) if d.is_dir() for p in d.iterdir()
             if _TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


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
        raise UserError(f"cannot read tensor file {path}: {one_line(e)}") from None


def looks_local(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """True when a model or dataset name means a local path, not a hub id ('owner/name' or 'name').

    The one rule for every `--base_model_id`, `--dataset_name` and reward path: it exists, starts like a path
    ('.', '/', '~'), holds a backslash or more than one '/', or ends with one of `file_suffixes`."""
    return (os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or "\\" in name
            or name.count("/") > 1 or Path(name).suffix.lower() in file_suffixes)


class BackgroundWriter:
    """Runs write jobs on one background thread, in submission order, so file I/O overlaps the caller's compute.
    When more than `max_pending` jobs wait, `submit` blocks until `drain_to` are left; a job's error (a full disk,
    say) is raised in the caller, at the next submit or at close."""

    def __init__(self, max_pending: int, drain_to: int):
        from concurrent.futures import ThreadPoolExecutor

        self.max_pending, self.drain_to = max_pending, drain_to
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1), []

    def submit(self, fn, *args) -> None:
        self.pending.append(self.pool.submit(fn, *args))
        block = len(self.pending) > self.max_pending
        while self.pending and (block or self.pending[0].done()):
            self.pending.pop(0).result()
            block = block and len(self.pending) > self.drain_to

    def close(self) -> None:
        """Wait for every job (also when the caller is being interrupted: finished work reaches the disk)."""
        try:
            while self.pending:
                self.pending.pop(0).result()
        finally:
            self.pool.shutdown(wait=True)
