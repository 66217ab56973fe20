"""One interface for every reward model (image-text preference / adherence scorers), and a lazy registry.

A scorer module registers a factory with `@register_reward(name)`. `load_reward(name, **options)` imports the
scorer's module on first use (listing the names imports none of them, so an HPSv2 evaluation never imports
the toy world) and calls the factory with the options it accepts. Every factory accepts `path` (a local
file/folder or hub id; None = the default weights), `device` ("auto", "cpu", "cuda", ... or a torch.device),
`dtype` (None/"auto" = float16 on CUDA, float32 elsewhere) and `batch_size`, plus its own (e.g. `version` for
hpsv2).

A user's own reward needs no registration: the name `FILE.py:NAME` loads the class or factory NAME from that
Python file (`reward_factory`); it is built with the options its signature accepts and its `score(images,
prompts)` must return one finite float per image (`check_scores`).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import sys
import traceback
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Sequence

from ..errors import UserError, one_line

# name -> the module that registers it (imported on first use)
BUILTIN_REWARDS = {
    "aesthetic": "golden_noise.rewards.aesthetic",
    "clipscore": "golden_noise.rewards.clipscore",
    "hpsv2": "golden_noise.rewards.hpsv2",
    "pickscore": "golden_noise.rewards.pickscore",
    "toy_attributes": "golden_noise_toy.reward",
}
_REGISTRY: dict[str, Callable[..., "RewardModel"]] = {}


class RewardModel(ABC):
    """Scores (image, prompt) pairs; higher is better. Subclasses live one per module in this package."""

    name: str = "reward"

    @abstractmethod
    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        """Score PIL images against their prompts (same length), one float each."""


def register_reward(name: str):
    """Class/factory decorator: make a reward loadable as `load_reward(name, **options)`."""

    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def available_rewards() -> list[str]:
    """Every registered or built-in reward name (imports nothing)."""
    return sorted(set(BUILTIN_REWARDS) | set(_REGISTRY))


PLUGIN_HELP = "FILE.py:NAME (a class or factory NAME in your Python file)"
_PLUGIN = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
_PLUGIN_MODULES: dict[Path, object] = {}


def plugin_spec(name: str) -> tuple[Path, str] | None:
    """(file, NAME) of a user reward written `FILE.py:NAME`, else None."""
    match = _PLUGIN.match(name)
    return (Path(match["file"]).expanduser(), match["name"]) if match else None


def is_reward_name(name: str) -> bool:
    """True for a registered or built-in reward name or a `FILE.py:NAME` user reward (imports nothing)."""
    return name in BUILTIN_REWARDS or name in _REGISTRY or plugin_spec(name) is not None


def metric_names(metrics: Sequence[str]) -> list[str]:
    """The name each metric has in outputs (CSV columns, summary.json, plots): a built-in name itself, a user
    reward `FILE.py:NAME` its NAME, or `{file stem}_{NAME}` when NAME alone would be ambiguous."""
    specs = {m: plugin_spec(m) for m in metrics}
    short = {m: spec[1] for m, spec in specs.items() if spec}
    counts: dict[str, int] = {}
    for m in metrics:
        key = short.get(m, m)
        counts[key] = counts.get(key, 0) + 1
    out = []
    for m in metrics:
        if m not in short:
            out.append(m)
        elif counts[short[m]] > 1 or short[m] in BUILTIN_REWARDS or short[m] in _REGISTRY:
            out.append(re.sub(r"[^A-Za-z0-9_.-]", "_", specs[m][0].stem) + "_" + short[m])
        else:
            out.append(short[m])
    return out


def _plugin_module(path: Path, spec: str):
    """Import the user's file once (a UserError names the file and the first line of what went wrong)."""
    path = path.resolve() if path.exists() else path
    if path in _PLUGIN_MODULES:
        return _PLUGIN_MODULES[path]
    if not path.is_file():
        raise UserError(f"--metrics {spec}: reward file {path} does not exist: pass FILE.py:NAME with an "
                        "existing Python file")
    module_name = "golden_noise_user_reward_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise UserError(f"--metrics {spec}: importing {path} failed{_where(e, path)} ({one_line(e, 200)})") \
            from None
    _PLUGIN_MODULES[path] = module
    return module


def _passes_through(exc: BaseException) -> bool:
    """Errors a user reward's own message must not hide: ours, and running out of (GPU) memory (the CLIs turn
    those into their one-line advice)."""
    return isinstance(exc, (UserError, MemoryError)) or type(exc).__name__ == "OutOfMemoryError"


def _where(exc: BaseException, path: Path) -> str:
    """' at line N' of the deepest traceback frame (or syntax error) in the user's file, else ''."""
    if isinstance(exc, SyntaxError) and exc.lineno:
        return f" at line {exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f" at line {frames[-1].lineno}" if frames else ""


def _plugin_factory(name: str) -> Callable[..., "RewardModel"]:
    """The class or factory NAME of a `FILE.py:NAME` user reward, wrapped so its scores are checked."""
    path, attr = plugin_spec(name)
    module = _plugin_module(path, name)
    if not hasattr(module, attr):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise UserError(f"--metrics {name}: {path} defines no {attr} (its classes and functions: "
                        f"{', '.join(defined) or 'none'})")
    factory = getattr(module, attr)
    if not callable(factory):
        raise UserError(f"--metrics {name}: {attr} in {path} is a {type(factory).__name__}, not a class or "
                        "factory: NAME must build an object with score(images, prompts)")
    return PluginFactory(name, path, factory)


class PluginFactory:
    """Builds a user reward with the options its signature accepts and checks what it returns."""

    def __init__(self, name: str, path: Path, factory: Callable):
        self.name, self.path, self.factory = name, path, factory
        try:
            self.__signature__ = inspect.signature(factory)
        except (TypeError, ValueError):  # a builtin or C callable: pass no options
            self.__signature__ = inspect.Signature()

    def __call__(self, **options) -> "RewardModel":
        try:
            reward = self.factory(**options)
        except Exception as e:
            if _passes_through(e):
                raise
            raise UserError(f"--metrics {self.name}: building it raised{_where(e, self.path.resolve())} "
                            f"({one_line(e, 200)})") from None
        if not callable(getattr(reward, "score", None)):
            raise UserError(f"--metrics {self.name}: {self.factory.__name__}(...) returned a "
                            f"{type(reward).__name__} without a score(images, prompts) method")
        return CheckedReward(reward, self.name, self.path)


class CheckedReward(RewardModel):
    """A user reward whose every `score` call is checked (one finite float per image)."""

    def __init__(self, reward, name: str, path: Path):
        self.reward, self.name, self.path = reward, name, path

    def score(self, images: Sequence, prompts: Sequence[str]) -> list[float]:
        try:
            scores = self.reward.score(list(images), list(prompts))
        except Exception as e:
            if _passes_through(e):
                raise
            raise UserError(f"--metrics {self.name}: score raised{_where(e, self.path.resolve())} "
                            f"({one_line(e, 200)})") from None
        return check_scores(scores, len(images), self.name)


def check_scores(scores, n: int, metric: str) -> list[float]:
    """`scores` as floats, or a UserError unless there is one finite number per image."""
    try:
        values = [float(s) for s in scores]
    except (TypeError, ValueError) as e:
        raise UserError(f"metric {metric}: score(images, prompts) must return a list of numbers ({one_line(e)})") \
            from None
    if len(values) != n:
        raise UserError(f"metric {metric}: score(images, prompts) returned {len(values)} values for {n} images: "
                        "return one float per image")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"metric {metric}: score(images, prompts) returned {values[bad[0]]} for image {bad[0]} of "
                        f"the batch ({len(bad)} non-finite of {n}): return finite floats")
    return values


def score_loaded_images(reward, images: Sequence, prompts: Sequence[str], batch_size: int,
                        metric: str = "reward") -> list[float]:
    """Score in-memory PIL images against their prompts, `batch_size` at a time; one finite float per image."""
    scores: list[float] = []
    for start in range(0, len(images), max(1, batch_size)):
        chunk = list(images[start:start + batch_size])
        scores.extend(check_scores(reward.score(chunk, list(prompts[start:start + len(chunk)])), len(chunk), metric))
    return scores


def reward_factory(name: str) -> Callable[..., "RewardModel"]:
    """The factory registered as `name` (importing its module on first use), or a user's `FILE.py:NAME`."""
    if name not in _REGISTRY and name in BUILTIN_REWARDS:
        importlib.import_module(BUILTIN_REWARDS[name])
    if name not in _REGISTRY and plugin_spec(name):
        return _plugin_factory(name)
    if name not in _REGISTRY:
        raise UserError(f"unknown metric {name!r}: choose from {', '.join(available_rewards())} or {PLUGIN_HELP}")
    return _REGISTRY[name]


def load_reward(name: str, **options) -> RewardModel:
    """Build the reward `name` with the options its factory accepts (all of them if it takes **kwargs)."""
    factory = reward_factory(name)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        options = {k: v for k, v in options.items() if k in params}
    return factory(**options)
