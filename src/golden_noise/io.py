"""File I/O shared by every stage: atomic writes and safe tensor loading."""
from __future__ import annotations

import errno
import io
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError, one_line


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
