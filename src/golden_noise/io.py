"""File I/O shared by every stage: atomic writes, checksums, safe tensor loading and the fast structure check of a
tensor file."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickletools
import re
import struct
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError, one_line


_TEMP_NAME = re.compile(r"^\.(.+)\.\d+\.[0-9a-f]{8}\.tmp$")  # atomic_path's temporary files: .{name}.{pid}.{hex8}.tmp


def remove_stale_temps(folders, owned: Callable[[str], bool] | None = None) -> int:
    """Delete the temporary files atomic_path's writers left in `folders` when they were killed (any other file,
    hidden or not, is left alone); with `owned`, only those whose target file name it accepts (other writers may
    share the folder). Returns how many."""
    stale = [p for d in map(Path, folders) if d.is_dir() for p in d.iterdir()
             if (m := _TEMP_NAME.match(p.name)) and p.is_file() and (owned is None or owned(m.group(1)))]
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


def tensor_bytes(obj) -> bytes:
    """`torch.save(obj)` as bytes (tensors and plain containers only): the same bytes for equal tensors, whatever
    file they end up in (torch.save names the zip's root folder after the file it writes; in memory it is
    always 'archive')."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically (tensors and plain containers only; loaded with weights_only), serialised
    through memory (`tensor_bytes`) so equal tensors give equal files."""
    atomic_write_bytes(path, tensor_bytes(obj))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The sha256 of a file's bytes, read in 4 MiB chunks (memory stays flat for any size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save_image(image, path: str | os.PathLike) -> None:
    """Save a PIL image atomically; the format comes from `path`'s suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG"))


def load_tensor(path: str | os.PathLike, data: bytes | None = None):
    """Load a tensor file written by this project (from `data`, its bytes, when given), never executing pickled
    code."""
    import torch

    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
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


# The end of a torch.save file (a zip archive): [central directory][zip64 end record (56 B)][zip64 locator (20 B)]
# [end-of-central-directory record (22 B), no comment]. A truncated file loses this tail.
_EOCD = struct.Struct("<4sHHHHIIH")           # signature, disks, entries here, entries, cd size, cd offset, comment
_ZIP64_LOCATOR = struct.Struct("<4sIQI")      # signature, disk, zip64 record offset, disks
_ZIP64_RECORD = struct.Struct("<4sQHHIIQQQQ")  # signature, size, versions, disks, entries here, entries, cd size/offset
_CENTRAL_ENTRY = struct.Struct("<4s16xIIHHH8xI")  # signature, packed size, size, name/extra/comment len, offset
_TAIL_BYTES = 4096  # enough for the central directory of a tensor file (about 500 B)


def tensor_file_intact(path: str | os.PathLike) -> bool:
    """A fast structural check of a tensor file written by torch.save (no unpickling, no data read): the zip's
    end records are where the file's size puts them, and the central directory they point to lists entries that
    lie inside the file. False for a missing, truncated or foreign (e.g. plain pickle) file. It cannot see a
    flipped payload byte: files whose bytes matter carry a checksum (stage 2's staging files, the shards)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        tail = os.pread(fd, min(size, _TAIL_BYTES), max(0, size - _TAIL_BYTES))
    except OSError:  # e.g. a directory
        return False
    finally:
        os.close(fd)
    return len(tail) >= _EOCD.size and _zip_tail_ok(tail, size)


def _zip_tail_ok(tail: bytes, size: int) -> bool:
    """The zip structure check of `tensor_file_intact` on the file's last bytes `tail` (a file of `size` bytes)."""
    base = size - len(tail)  # file offset of tail[0]
    signature, _, _, _, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, len(tail) - _EOCD.size)
    if signature != b"PK\x05\x06" or comment:
        return False
    cd_end = size - _EOCD.size
    locator = len(tail) - _EOCD.size - _ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":  # zip64: the counts are in the zip64 record
        cd_end = _ZIP64_LOCATOR.unpack_from(tail, locator)[2]
        if not base <= cd_end <= locator + base - _ZIP64_RECORD.size:
            return False
        record = _ZIP64_RECORD.unpack_from(tail, cd_end - base)
        if record[0] != b"PK\x06\x06":
            return False
        entries, cd_size, cd_offset = record[7:10]
    if entries == 0 or cd_offset + cd_size != cd_end:
        return False
    if cd_offset < base:  # a central directory larger than the tail: its bounds were checked, not its entries
        return True
    pos = cd_offset - base
    for _ in range(entries):  # each entry's local data must end before the central directory starts
        if pos + _CENTRAL_ENTRY.size > cd_end - base:
            return False
        signature, packed, _, name_len, extra_len, comment_len, local_offset = _CENTRAL_ENTRY.unpack_from(tail, pos)
        if signature != b"PK\x01\x02":
            return False
        if local_offset != 0xFFFFFFFF and packed != 0xFFFFFFFF and local_offset + 30 + packed > cd_offset:
            return False
        pos += _CENTRAL_ENTRY.size + name_len + extra_len + comment_len
    return pos == cd_end - base


# what the data.pkl of a plain tensor saved by torch.save may name: the rebuild function, storage types, OrderedDict
_TENSOR_PICKLE_GLOBALS = re.compile(r"^(torch\._utils _rebuild_tensor_v2|torch \w+Storage|collections OrderedDict)$")


def tensor_file_problem(source: str | os.PathLike | bytes) -> str | None:
    """Why a torch.save file (a path, or its bytes) is not an intact plain tensor file, or None. Reads every byte:
    each zip entry's CRC-32, which torch.save records when it writes the file, must match (one flipped byte
    anywhere fails), and the pickle inside must be that of a plain tensor (`_pickle_problem`: a torch zip holding a
    foreign pickle fails too). Nothing is unpickled."""
    try:
        with zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(names) != 1:
                return "is not a torch tensor file (its zip lacks data.pkl)"
            for info in zf.infolist():
                if (info.compress_type, info.external_attr, info.internal_attr) != (zipfile.ZIP_STORED, 0, 0) \
                        or info.compress_size != info.file_size:  # torch.save stores entries plainly
                    return f"is not a torch tensor file as torch.save writes it (entry {info.filename}): corrupt"
                with zf.open(info) as f:  # zipfile checks the entry's CRC-32 when it reaches its end
                    while f.read(1 << 22):
                        pass
            pkl = zf.read(names[0])
    except FileNotFoundError:
        return "missing"
    except zipfile.BadZipFile as e:
        if "CRC" in str(e):
            return f"fails its checksum ({one_line(e)}): a damaged byte"
        return f"is not a complete torch tensor file ({one_line(e)}): truncated or corrupt"
    except Exception as e:  # OSError, EOFError, an unknown compression method ...: not what torch.save writes
        return f"is not a complete torch tensor file ({one_line(e)}): truncated or corrupt"
    return _pickle_problem(pkl)


def _pickle_problem(pkl: bytes) -> str | None:
    """Why a data.pkl is not that of a plain tensor, or None: it may name nothing but torch's tensor rebuild
    function, a storage type and OrderedDict (what `torch.save(tensor)` writes), read without unpickling."""
    try:
        for op, arg, _ in pickletools.genops(pkl):
            if op.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):  # torch.save (protocol 2) uses none
                return f"holds a pickle with a {op.name} instruction, not a plain tensor: a foreign file"
            if op.name == "GLOBAL" and not _TENSOR_PICKLE_GLOBALS.match(str(arg)):
                return f"holds a pickle that names {arg!r}, not a plain tensor: a foreign file"
    except Exception as e:  # a pickle that does not even parse
        return f"holds an unreadable pickle ({one_line(e)})"
    return None
