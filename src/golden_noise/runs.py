"""Rules for a stage's output folder: what may be added to it (a rerun with the same inputs and settings),
what is refused (anything else, with every difference named), a lock so two runs never make the same part of one,
and which part a run makes when K separate runs (machines, a Slurm job array) share the work (`Task`)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .cli import setting
from .errors import UserError


def jsonable(value):
    """`value` as it reads back from JSON (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))



def settings_differences(old: dict, new: dict, keys: Sequence[str], lenient: Sequence[str] = ()) -> list[str]:
    """'key: old -> new' for each of `keys` that differs; keys in `lenient` are ignored when either side is None."""
    fresh = jsonable(new)
    diffs = []
    for k in keys:
        a, b = old.get(k), fresh.get(k)
        if a == b or (k in lenient and None in (a, b)):
            continue
        if isinstance(a, str) and isinstance(b, str) and len(a) == len(b) == 64:  # fingerprints: say so briefly
            diffs.append(f"{k}: {a[:12]}... -> {b[:12]}...")
        else:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


def read_settings(path: Path, flag: str) -> dict | None:
    """The JSON settings a previous run wrote at `path`, or None when there is none."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): remove it or choose another {flag}") from None


def refuse_other_settings(where, old: dict, new: dict, keys: Sequence[str], advice: str, what: str = "outputs",
                          lenient: Sequence[str] = ()) -> None:
    """A UserError naming each of `keys` whose value in `new` differs from the `old` settings recorded in `where`
    (a folder or file), followed by `advice`."""
    diffs = settings_differences(old, new, keys, lenient)
    if diffs:
        raise UserError(f"{where} holds {what} made with other inputs or settings ({'; '.join(diffs)}): {advice}")


def refuse_mixed_rerun(path: Path, new: dict, keys: Sequence[str], flag: str, what: str = "outputs",
                       lenient: Sequence[str] = ()) -> dict | None:
    """Refuse to add to a folder whose settings file `path` records other `keys` than `new`, naming each
    difference; returns the old settings (None for a fresh folder)."""
    old = read_settings(path, flag)
    if old is None:
        return None
    refuse_other_settings(path.parent, old, new, keys, f"rerun with the same inputs and flags, or choose another "
                          f"{flag}", what, lenient)
    return old


def keep_unused(new: dict, old: dict, keys: Sequence[str]) -> dict:
    """The settings to record after a rerun that `lenient` let through: each of `keys` this run left None (its
    methods do not use it) keeps the earlier run's value, so the record still names what made the older outputs."""
    return {**new, **{k: old[k] for k in keys if new.get(k) is None and old.get(k) is not None}}


SHARDS_GROUP = "shards and machines"  # the --help group of the three fields below


def num_shards_setting(split: str, makes: str) -> int | None:
    """A job's --num_shards field: K separate runs share `split`; run i makes `makes` (e.g. 'shards i, i + K, ...')."""
    return setting(None, f"K: split {split} among K separate runs (machines); this run makes {makes} (default: "
                         "$SLURM_ARRAY_TASK_COUNT, else 1)", group=SHARDS_GROUP, min=1)


def shard_index_setting() -> int | None:
    """A job's --shard_index field (which of the K runs; Slurm array default)."""
    return setting(None, "i: which of the K runs this is, 0 <= i < K (default: $SLURM_ARRAY_TASK_ID - "
                         "$SLURM_ARRAY_TASK_MIN, else 0)", group=SHARDS_GROUP, min=0)


def finalize_setting(help: str) -> bool:
    """A job's --finalize field: what the run that completes the job writes, alone."""
    return setting(False, help, group=SHARDS_GROUP)


@dataclass(frozen=True)
class Task:
    """Which part of a job a run makes when `count` separate runs (machines, with no launcher and no communication)
    share it: task `index` takes parts index, index + count, index + 2 count, ... (stage 2's shards, stage 5's global
    batches); whatever the split, each part is made exactly as one run makes it."""

    count: int = 1
    index: int = 0

    def share(self, items: Sequence) -> list:
        """This task's round-robin share of `items`."""
        return list(items[self.index::self.count])

    def shards(self, total: int) -> list[int]:
        return self.share(range(total))

    @classmethod
    def resolve(cls, num_shards: int | None, shard_index: int | None, environ=os.environ) -> "Task":
        """--num_shards/--shard_index, defaulting to a Slurm job array's task count and id, else one task."""
        count, index = num_shards, shard_index
        slurm = environ.get("SLURM_ARRAY_TASK_COUNT")
        if count is None and slurm:
            count = int(slurm)
        if index is None and environ.get("SLURM_ARRAY_TASK_ID") and (num_shards is None or slurm):
            index = int(environ["SLURM_ARRAY_TASK_ID"]) - int(environ.get("SLURM_ARRAY_TASK_MIN") or 0)
        if count is None and index is not None:
            raise UserError(f"--shard_index {index} needs --num_shards K (the number of separate runs)")
        count, index = count or 1, index or 0
        if not 0 <= index < count:
            raise UserError(f"--shard_index {index} must be in [0, {count}) for --num_shards {count}")
        return cls(count, index)


def check_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create `path` if needed and prove it writable (a probe file), before any work; a UserError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise UserError(f"{flag} {path} is not a writable folder ({reason}): choose another {flag}") from None
    return path


class RunLock:
    """An exclusive lock on an output folder (`<folder>/.lock`, flock): a second run into it is refused.

    With `ranges`, the lock covers only those parts of the folder's work (POSIX record locks on those bytes of the
    same file): runs that share a folder but own disjoint parts (stage 2's shards made on several machines) go
    together, a second run of any part is refused. The lock dies with its process (also on kill -9), so a stale
    lock file never blocks a rerun.

    With `wait` (and no ranges), a short exclusive section instead: acquire waits for the holder (runs that share a
    folder take turns writing the files they all write, e.g. stage 5's manifest); `name` is then another lock file
    than the runs' `.lock`."""

    def __init__(self, folder: str | os.PathLike, flag: str, ranges: Sequence[int] | None = None,
                 what: str = "part", name: str = ".lock", wait: bool = False):
        self.path, self.flag, self.fd, self.wait = Path(folder) / name, flag, None, wait
        self.ranges, self.what = (sorted(set(ranges)) if ranges is not None else None), what

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if self.ranges is not None:
            try:
                for k in self.ranges:
                    self._lock_record(fd, k)
            except UserError:
                os.close(fd)  # releases the record locks taken so far
                raise
            self.fd = fd
            return self
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            holder = self.path.read_text(encoding="utf-8", errors="replace").strip() or "another process"
            raise UserError(f"{self.path.parent} is in use by a running job ({holder}): wait for it to finish or "
                            f"choose another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}".encode())
        self.fd = fd
        return self

    def add(self, ranges: Sequence[int]) -> None:
        """Also lock `ranges` (a held range lock; the same file descriptor: closing another one on this file would
        drop every record lock of the process)."""
        for k in sorted(set(ranges) - set(self.ranges or ())):
            self._lock_record(self.fd, k)
            self.ranges.append(k)

    def _lock_record(self, fd: int, k: int) -> None:
        """Lock byte k of the lock file (part k of the work), or a UserError naming the process that holds it."""
        import fcntl

        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, k)
        except OSError:  # EAGAIN / EACCES: another process holds it
            raise UserError(f"{self.path.parent} is in use by a running job ({_record_lock_holder(fd, k)}, "
                            f"{self.what} {k}): wait for it to finish or choose another {self.flag}") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _record_lock_holder(fd: int, offset: int) -> str:
    """'pid N' of the process holding a POSIX record lock on byte `offset` of `fd` (Linux's struct flock)."""
    import fcntl
    import struct

    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
        result = fcntl.fcntl(fd, fcntl.F_GETLK, probe + b"\0" * 8)
        pid = struct.unpack("hhqqi", result[:struct.calcsize("hhqqi")])[4]
        return f"pid {pid}" if pid > 0 else "another process"
    except (OSError, struct.error, ValueError):
        return "another process"
