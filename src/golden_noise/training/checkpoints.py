"""Resumable training checkpoints (`<output_dir>/checkpoint-{step}/`, written by accelerate's save_state): find,
verify, prune and set aside.

Verification reads every file the way accelerate will load it (safetensors for the model, `torch.load` with
`weights_only=True` for the optimizer, scheduler and random states), so a damaged checkpoint is reported by file
before anything is loaded, not by a traceback halfway through loading, and never skipped: accelerate's load_state
ignores an unreadable random_states_*.pkl with an info line. Nothing runs pickled code: the weights-only
unpickler accepts tensors, plain data and numpy's array types only, here and in accelerate's own loading (which
uses the same loader), and a file that passed here holds nothing else."""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from ..errors import UserError, one_line
from ..runtime import get_logger

logger = get_logger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINING_STATE = "training_state.json"
DAMAGED_PREFIX = "damaged-"
# accelerate's save_state names (one model, optimizer and scheduler; one random state per process)
MODEL_FILE, OPTIMIZER_FILE, SCHEDULER_FILE = "model.safetensors", "optimizer.bin", "scheduler.bin"
RANDOM_STATES = "random_states_{}.pkl"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """`checkpoint-{step}` folders in `output_dir`, oldest (lowest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    """The step of a `checkpoint-{step}` folder."""
    m = CHECKPOINT_RE.match(Path(path).name)
    if not m:
        raise UserError(f"{path} is not a checkpoint-<step> folder written by this training script")
    return int(m.group(1))


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete the oldest checkpoints so that at most `keep` remain (keep <= 0 keeps all); returns the deleted."""
    if keep <= 0:
        return []
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[: max(0, len(ckpts) - keep)]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def remove_stale_temp(output_dir: str | Path) -> list[Path]:
    """Delete `.checkpoint-{step}.tmp` folders that a killed run left half-written; returns them."""
    root = Path(output_dir)
    stale = sorted(root.glob(".checkpoint-*.tmp")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def read_training_state(ckpt: str | Path) -> dict:
    """The checkpoint's training_state.json (global_step, model_config, num_processes, args)."""
    path = Path(ckpt) / TRAINING_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        int(state["global_step"]), dict(state["model_config"])
    except FileNotFoundError:
        raise UserError(f"checkpoint {ckpt} is damaged: {path} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint {ckpt} is damaged: {path}: {one_line(e)}") from None
    return state


def read_export_args(path: str | Path) -> dict:
    """The training settings (`training.args`) an export's JSON records ({} when it records none)."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({one_line(e)}): move the export away or choose a new --output_dir") \
            from None
    return (meta.get("training") or {}).get("args") or {} if isinstance(meta, dict) else {}


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # checks the header and that the data covers the file
        f.keys()


def _check_torch_file(path: Path, keys: tuple[str, ...]) -> None:
    from accelerate.utils import load  # torch.load allowing numpy's array types (the random states hold some)

    with warnings.catch_warnings():  # e.g. torch's note on an unusual pickle protocol: the error says enough
        warnings.simplefilter("ignore")
        obj = load(path, map_location="cpu", weights_only=True)  # only tensors and plain data: never runs code
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise ValueError(f"not the expected state (lacks {', '.join(missing)})")


def verify_checkpoint(ckpt: str | Path) -> dict:
    """Read every file of a checkpoint as resuming will; a UserError names the first damaged one.

    Returns its training state. Checks the model (safetensors header and size), the optimizer and scheduler
    states and one random state per process that wrote it, all loaded without executing pickled code."""
    ckpt = Path(ckpt)
    state = read_training_state(ckpt)
    files = [(MODEL_FILE, None), (OPTIMIZER_FILE, ("state", "param_groups")), (SCHEDULER_FILE, ("last_epoch",))]
    procs = int(state.get("num_processes") or 1)
    files += [(RANDOM_STATES.format(i), ("random_state", "numpy_random_seed", "torch_manual_seed"))
              for i in range(procs)]
    for name, keys in files:
        path = ckpt / name
        if not path.is_file():
            raise UserError(f"checkpoint {ckpt} is damaged: {path} is missing")
        try:
            _check_safetensors(path) if keys is None else _check_torch_file(path, keys)
        except Exception as e:  # truncated, corrupt, a pickle with foreign code, or another kind of file
            raise UserError(f"checkpoint {ckpt} is damaged: {path} cannot be read ({one_line(e, 200)})") from None
    return state


def find_resume_checkpoint(output_dir: str | Path, resume: str | None, fallback: bool = False) -> Path | None:
    """`--resume_from_checkpoint`: None, 'latest' (None when there is none yet) or a checkpoint path, verified.

    A damaged checkpoint is an error naming its file; with `fallback` and 'latest', the newest intact one is
    used instead (and named in the log)."""
    if not resume:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"--resume_from_checkpoint {resume}: no such checkpoint folder (use 'latest' or a "
                            f"checkpoint-<step> folder of {output_dir})")
        checkpoint_step(path)
        verify_checkpoint(path)
        return path
    damaged = []
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(ckpt)
        except UserError as e:
            if not fallback:
                raise UserError(f"{e}: pass --resume_fallback to resume from the newest intact checkpoint, or "
                                "--resume_from_checkpoint <checkpoint folder>") from None
            logger.warning("%s", e)
            damaged.append(ckpt)
            continue
        if damaged:
            logger.warning("--resume_fallback: resuming from %s, the newest intact checkpoint (damaged: %s)", ckpt,
                           ", ".join(p.name for p in damaged))
        return ckpt
    if damaged:
        raise UserError(f"every checkpoint in {output_dir} is damaged ({', '.join(p.name for p in damaged)}): "
                        "start a new --output_dir")
    return None


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints after `step` (damaged ones skipped by --resume_fallback) to damaged-checkpoint-{n},
    so the resumed run neither prunes its new checkpoints in their favour nor resumes from them later."""
    moved = []
    for ckpt in list_checkpoints(output_dir):
        if checkpoint_step(ckpt) > step:
            target = ckpt.with_name(DAMAGED_PREFIX + ckpt.name)
            if target.exists():
                shutil.rmtree(target)
            ckpt.rename(target)
            moved.append(target)
    return moved
