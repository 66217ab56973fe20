"""Argparse helpers shared by every CLI: one help format, flags generated from config dataclasses, list flags
that take both `a b c` and the older `a,b,c`, and early checks of numeric flags."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterable, Sequence


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' to a flag's help unless the help already says its default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or any(action.default is v for v in (None, argparse.SUPPRESS,
                                                                                              False)):
            return text
        if isinstance(action.default, (list, tuple)):
            return f"{text} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the first paragraph of a script's docstring."""
    description = (doc or "").strip().split("\n\n")[0]
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def split_list(values: Iterable[str]) -> list[str]:
    """['a', 'b,c', ' d '] -> ['a', 'b', 'c', 'd']: space- and comma-separated items, blanks dropped."""
    return [item.strip() for value in values for item in str(value).split(",") if item.strip()]


class ListAction(argparse.Action):
    """nargs='+' whose items may also be comma-separated; converts with `item_type` and checks `valid`."""

    def __init__(self, option_strings, dest, item_type: Callable[[str], Any] = str,
                 valid: Callable[[Any], bool] | None = None, valid_help: str | None = None, **kwargs):
        kwargs.setdefault("nargs", "+")
        super().__init__(option_strings, dest, **kwargs)
        self.item_type, self.valid, self.valid_help = item_type, valid, valid_help

    def __call__(self, parser, namespace, values, option_string=None):
        items = []
        for raw in split_list(values if isinstance(values, list) else [values]):
            try:
                item = self.item_type(raw)
            except (TypeError, ValueError):
                parser.error(f"{option_string}: invalid value {raw!r}")
            if self.valid is not None and not self.valid(item):
                parser.error(f"{option_string}: invalid choice {raw!r} ({self.valid_help})")
            items.append(item)
        if not items:
            parser.error(f"{option_string} needs at least one value")
        setattr(namespace, self.dest, items)


def add_list_argument(group, flag: str, *, choices: Sequence[str] | None = None, item_type=str,
                      valid: Callable[[Any], bool] | None = None, valid_help: str | None = None, **kwargs):
    """A list flag: `--flag a b` or `--flag a,b`; `choices` (or a `valid` predicate) checks each item."""
    if choices is not None:
        allowed = list(choices)
        valid = valid or (lambda item: item in allowed)
        valid_help = valid_help or "choose from " + ", ".join(map(str, allowed))
        kwargs.setdefault("metavar", "{" + ",".join(map(str, allowed)) + "}")
    return group.add_argument(flag, action=ListAction, item_type=item_type, valid=valid, valid_help=valid_help,
                              **kwargs)


def _base_type(annotation) -> tuple[Any, bool]:
    """(element type, is_list) of a resolved dataclass field annotation (typing.get_type_hints) such as int,
    float | None or list[int]."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return typing.get_args(annotation)[0], True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(inner[0])
    return annotation, False


def dataclass_defaults(cls) -> dict[str, Any]:
    """{field name: default} of a dataclass (default factories called)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def add_dataclass_arguments(group, cls, include: Sequence[str] | None = None, exclude: Sequence[str] = (),
                            defaults: dict[str, Any] | None = None, helps: dict[str, str] | None = None,
                            flag_names: dict[str, str] | None = None) -> list[str]:
    """Add a `--name` flag per dataclass field (type, default and help from the field: `metadata['help']`).

    bool fields become store_true flags (default False) or --name/--no-name; list fields take `a b` or `a,b`.
    `defaults` overrides defaults (e.g. None = "from the data"). Returns the field names added."""
    defaults, helps, flag_names = defaults or {}, helps or {}, flag_names or {}
    base = dataclass_defaults(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if (include is not None and f.name not in include) or f.name in exclude or not f.init:
            continue
        flag = "--" + flag_names.get(f.name, f.name)
        default = defaults.get(f.name, base.get(f.name))
        help_text = helps.get(f.name, f.metadata.get("help", f.name.replace("_", " ")))
        kind, is_list = _base_type(hints[f.name])
        if kind is bool:
            if default:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=True,
                                   help=help_text)
            else:
                group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif is_list:
            add_list_argument(group, flag, dest=f.name, item_type=kind, default=default, help=help_text,
                              metavar=f.name.upper())
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text,
                               choices=f.metadata.get("choices"))
        added.append(f.name)
    return added


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    """Build `cls` from the parsed flags of the same names (fields without a flag keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)


def check_flag_minimum(parser: argparse.ArgumentParser, args: argparse.Namespace, flags: Sequence[str],
                       minimum: float = 1) -> None:
    """`parser.error` (usage + one line, exit 2) naming the first of `flags` that is set and below `minimum`."""
    for flag in flags:
        value = getattr(args, flag)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is not None and v < minimum:
                need = "must not be negative" if minimum == 0 else f"must be at least {minimum:g}"
                parser.error(f"--{flag} {need}, got {v}")


def add_pipeline_arguments(group, base_model_id: str | None, base_model_help: str) -> None:
    """The flags that say which diffusers pipeline to load and how (shared by stages 2, 4 and 5 and the sweep):
    --base_model_id --revision --variant --dtype --device, and the memory savers --enable_model_cpu_offload
    --enable_vae_slicing --enable_vae_tiling."""
    from .runtime import DEVICE_HELP, DTYPE_CHOICES

    group.add_argument("--base_model_id", default=base_model_id, help=base_model_help)
    group.add_argument("--revision", default=None, help="hub revision of --base_model_id (branch, tag or commit)")
    group.add_argument("--variant", default=None, help="weights variant of --base_model_id, e.g. fp16")
    group.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_CHOICES],
                       help="pipeline dtype: auto = float16 on CUDA, float32 elsewhere")
    group.add_argument("--device", default="auto", help=DEVICE_HELP + "; under accelerate launch, auto = this "
                       "process's device")
    group.add_argument("--enable_model_cpu_offload", action="store_true",
                       help="keep each model on the CPU until it runs (less GPU memory, slower; needs accelerate)")
    group.add_argument("--enable_vae_slicing", action="store_true",
                       help="decode images one at a time (less memory for large batches)")
    group.add_argument("--enable_vae_tiling", action="store_true",
                       help="decode in tiles (less memory for large images)")
