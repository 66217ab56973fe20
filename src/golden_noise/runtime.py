"""Devices, dtypes, logging and the CLI wrapper shared by every stage."""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn, Sequence

import torch

from .errors import UserError, one_line

DTYPES = {  # the one table of dtype names
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DTYPE_CHOICES = ["float32", "float16", "bfloat16"]
DEVICE_HELP = "device: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name ('float16', 'fp16', ...) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPE_CHOICES)}") from None


def model_dtype(name: str, device: torch.device | str) -> str:
    """A `--dtype` flag's value: 'auto' is float16 on CUDA and float32 elsewhere; other names pass through."""
    if name != "auto":
        return name
    return "float16" if torch.device(device).type == "cuda" else "float32"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks cuda, then mps, then cpu; other names are checked for availability."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: {DEVICE_HELP}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, but no CUDA GPU is available: use --device auto or cpu")
    return device


def distributed_state():
    """accelerate's PartialState, multi-process on CPU too.

    `PartialState()` only forms a CPU process group when asked for the CPU, so ACCELERATE_USE_CPU=1 (or no
    CUDA under a multi-process launch) is passed on as `cpu=True`; otherwise each process would believe it is
    rank 0 of 1.
    """
    from accelerate import PartialState

    return PartialState(cpu=_cpu_asked() or gloo_launch())


def _cpu_asked() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def gloo_launch() -> bool:
    """True in a multi-process launch on CPU, where torch.distributed runs over gloo."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and (_cpu_asked() or not torch.cuda.is_available())


def exit_cli(code: int, skip_teardown: bool = False) -> NoReturn:
    """Exit with `code`; with `skip_teardown`, flush and leave without the interpreter's C++ teardown.

    Used after a multi-process CPU training run: wrapping a model in DistributedDataParallel keeps the gloo
    process group alive inside torch even after destroy_process_group (its worker threads survive every Python
    reference), and tearing those threads down at interpreter exit sometimes aborts the process
    ('terminate called without an active exception', SIGABRT) after all work is written, which fails the launch.
    Everything the run produces is written and flushed before this is called.
    """
    if not skip_teardown:
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_distributed(state) -> None:
    """Leave a multi-process run together: wait for every process, then destroy the process group.

    The barrier keeps a process that finishes early from tearing the group down while the main one still
    writes the outputs; destroying it before exit is what torch.distributed asks of every program.
    """
    if state is None or state.num_processes <= 1:
        return
    state.wait_for_everyone()
    state.destroy_process_group()


def get_logger(name: str) -> logging.Logger:
    """A logger that prints 'time level message' to stderr once configured by `setup_logging`."""
    return logging.getLogger(name)


def setup_logging(main_process: bool = True, quiet_diffusion_libraries: bool = True) -> None:
    """Log INFO on the main process only; others log warnings and errors.

    `quiet_diffusion_libraries=False` skips `quiet_libraries()` (which imports diffusers and transformers,
    ~2 s) for stages that never load a model.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if main_process else logging.WARNING, force=True)
    for noisy in ("httpx", "urllib3", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet_diffusion_libraries:
        quiet_libraries()


class _EachMessageOnce(logging.Filter):
    """Lets a record through the first time its logger says exactly that text, and (`below`) none under a level."""

    def __init__(self, below: int = logging.NOTSET):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()
        self.below = below

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen or record.levelno < self.below:
            return False
        self.seen.add(key)
        return True


@contextmanager
def each_message_once(main_process: bool = True) -> Iterator[None]:
    """Within the block, a log message that repeats word for word is logged once: the sweep runs stage 5's batch
    runner once per cell, and its warnings and notes about the same flags (an n the RNN was not trained on, a
    guidance scale <= 1) would otherwise repeat for every cell. Every process runs the same checks on the same
    inputs, so the other processes (`main_process=False`) say only errors. Filters the handlers of the root
    logger, where every logger's records end."""
    once = _EachMessageOnce(logging.NOTSET if main_process else logging.ERROR)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(once)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(once)


def quiet_libraries() -> None:
    """Silence the per-component loading bars and info logs of diffusers/transformers/hub."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover - the libraries are optional for some stages
        pass


def run_cli(main: Callable, parse_args: Callable, argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run `main(args)`, and turn a UserError (or running out of GPU memory) into one line on
    stderr and exit code 2. A flag error is argparse's (golden_noise.cli.Parser: one line, exit code 2)."""
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag error: the exit code, as `python script` gives it
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    try:
        main(args)
    except UserError as e:
        print(f"error: {one_line(e, limit=2000)}", file=sys.stderr)
        return 2
    except torch.cuda.OutOfMemoryError as e:
        print(f"error: out of GPU memory ({one_line(e, limit=160)}): use a smaller --batch_size, --dtype float16, "
              "or --enable_model_cpu_offload / --enable_vae_slicing where the stage has them", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def package_versions(*extra: str) -> dict[str, str]:
    """{package: installed version} of torch, diffusers, transformers, accelerate and `extra` (those installed)."""
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def global_batches(items: Sequence, batch_size: int) -> list[list]:
    """Fixed batches items[kB:(k+1)B] over the whole list: a sample is always computed in the same batch, whatever
    the process count or resume point, so outputs do not depend on either."""
    return [list(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]


def shard(batches: Sequence, process_index: int, num_processes: int) -> list:
    """This process's round-robin share of the global batches: r, r + P, r + 2P, ..."""
    return list(batches[process_index::num_processes])


def on_main(state, fn: Callable):
    """fn() on the main process of `state` (an accelerate PartialState or Accelerator), its result shared with every
    process; a UserError there is raised on every process, so none waits forever at the next barrier."""
    verdict = [None, ""]
    if state.is_main_process:
        try:
            verdict[0] = fn()
        except UserError as e:
            verdict[1] = str(e)
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        verdict = broadcast_object_list(verdict)
    if verdict[1]:
        raise UserError(verdict[1])
    return verdict[0]
