"""Argparse helpers shared by every CLI: one help format, flags generated from config dataclasses, list flags
that take both `a b c` and the older `a,b,c`, and the one rule for a setting's values.

A setting is a dataclass field declared with `setting(default, help, ...)`: its metadata holds its help, its
range (`min`/`max` inclusive, `above`/`below` exclusive), its `choices`, its --help `group`, and which keys of a
run's settings record it when it shapes the outputs' bytes (`rerun`, checked before any model loads; `loaded`,
checked once the models are loaded; `when_unused`, the keys a run leaves None when it does not use the setting).
Every float, a field or a hand-written flag, must be finite. Flags generated from a field, and hand-written flags
added with `argument(...)`, are checked after parsing (one line, exit 2); `check_fields(obj)` applies the same rule
to a dataclass built in code (a UserError naming the flag); `rerun_keys(cls, ...)` derives the keys a rerun into
the same folder must keep."""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable, Iterable, Mapping, Sequence

from .errors import UserError
from .runtime import DEVICE_HELP, DTYPE_CHOICES

# torch.Generator().manual_seed takes a signed 64-bit seed: every seed flag and every start_seed + index stays in
# [0, SEED_MAX]
SEED_MAX = 2 ** 63 - 1
SEED_RULES = {"min": 0, "max": SEED_MAX}
RANGE_KEYS = ("min", "max", "above", "below")
# how a field's flag is spelled: its help, choices, metavar; for a list, a predicate `valid` (with `valid_help`)
# instead of choices, or `append` (a repeatable flag, one item each)
FLAG_KEYS = ("help", "choices", "valid", "valid_help", "metavar", "append")


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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`error: ...`, exit 2) and which checks every flag that carries a
    rule (a field's range, a finite float) after parsing."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            problem = action_problem(action, getattr(namespace, action.dest, None))
            if problem:
                self.error(problem)
        return namespace, extras

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def parser(doc: str | None, first_paragraph: bool = True) -> Parser:
    """A Parser whose description is the first paragraph of a script's docstring (or all of it)."""
    description = (doc or "").strip()
    return Parser(description=description.split("\n\n")[0] if first_paragraph else description,
                  formatter_class=HelpFormatter)


# ---------------------------------------------------------------- the rule of a setting's values
def setting(default: Any = dataclasses.MISSING, help: str | None = None, *,
            default_factory: Any = dataclasses.MISSING, **metadata) -> Any:
    """A dataclass field with its help and rules in its metadata (see the module docstring): min, max, above,
    below; choices; how its flag is spelled (metavar; for a list valid/valid_help or append); group; and the
    settings keys that record it for a rerun (rerun, loaded, when_unused)."""
    if help is not None:
        metadata["help"] = help
    unknown = set(metadata) - {*FLAG_KEYS, "group", "rerun", "loaded", "when_unused", *RANGE_KEYS}
    if unknown:
        raise TypeError(f"unknown setting metadata: {sorted(unknown)}")
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def value_problem(value: Any, rules: Mapping[str, Any]) -> str | None:
    """What is wrong with one value under `rules` ('must be ...'), or None: a float must be finite, a number must
    lie in the range of min/max (inclusive) and above/below (exclusive), a value in `choices` if given."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, (int, float)):
        low, low_open = (rules["above"], True) if "above" in rules else (rules.get("min"), False)
        high, high_open = (rules["below"], True) if "below" in rules else (rules.get("max"), False)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            if low is not None and high is not None:
                return (f"must be in {'(' if low_open else '['}{_number(low)}, {_number(high)}"
                        f"{')' if high_open else ']'}")
            if low is not None:
                if low == 0:
                    return "must be positive" if low_open else "must not be negative"
                return f"must be {'greater than' if low_open else 'at least'} {_number(low)}"
            return f"must be {'less than' if high_open else 'at most'} {_number(high)}"
    choices = rules.get("choices")
    if choices is not None and value not in choices:
        return f"must be one of {', '.join(map(str, choices))}"
    return None


def values_problem(flag: str, value: Any, rules: Mapping[str, Any]) -> str | None:
    """'--flag must be ..., got v' for the first bad item of `value` (a value or a list of them), or None."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        problem = value_problem(item, rules)
        if problem:
            return f"{flag} {problem}, got {item}"
    return None


def action_problem(action: argparse.Action, value: Any) -> str | None:
    """The problem of a parsed flag's value under its rules (`argument(...)`, dataclass flags) and, for a float
    flag, the finite rule."""
    rules = getattr(action, "rules", None)
    is_float = action.type is float or action.type is finite_float or getattr(action, "item_type", None) in (
        float, finite_float)
    if rules is None and not is_float:
        return None
    return values_problem(action.option_strings[0], value, {k: v for k, v in (rules or {}).items()
                                                            if k != "choices"})


def finite_float(text: str) -> float:
    """argparse type of a float flag: a finite float ('nan', 'inf' are refused)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


finite_float.__name__ = "float"  # argparse names the type in its message: "invalid float value: 'x'"


def argument(group, *flags: str, **kwargs) -> argparse.Action:
    """`group.add_argument(*flags, **kwargs)` whose rules (min, max, above, below) are checked after parsing; a
    float flag gets the finite rule."""
    rules = {k: kwargs.pop(k) for k in RANGE_KEYS if k in kwargs}
    if kwargs.get("type") is float:
        kwargs["type"] = finite_float
    action = group.add_argument(*flags, **kwargs)
    action.rules = rules
    return action


def check_fields(obj, flag_names: Mapping[str, str] | None = None) -> None:
    """Apply every field's rules (and the finite rule of floats) to a dataclass instance and the dataclasses it
    holds; a UserError names the flag of the first bad value."""
    flag_names = flag_names or {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, flag_names)
            continue
        problem = values_problem("--" + flag_names.get(f.name, f.name), value, f.metadata)
        if problem:
            raise UserError(problem)


def check_seeds(flag: str, start_seed: int, last_offset: int, what: str = "the last prompt index") -> None:
    """Refuse a start seed whose last seed (start_seed + last_offset) is past SEED_MAX, naming the flag."""
    if start_seed + last_offset > SEED_MAX:
        raise UserError(f"{flag} {start_seed} + {what} {last_offset} = {start_seed + last_offset} is past the largest "
                        f"seed, 2**63 - 1 = {SEED_MAX}: use a smaller {flag}")


# ---------------------------------------------------------------- the settings a rerun must keep
def _nested(f: dataclasses.Field, hints: dict) -> type | None:
    """The dataclass a field holds, if it holds one."""
    kind = hints.get(f.name)
    return kind if dataclasses.is_dataclass(kind) else None


def setting_fields(cls, exclude: Sequence[str] = ()) -> list[dataclasses.Field]:
    """The fields of `cls` and of the dataclasses its fields hold (depth first, in order), minus `exclude`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        nested = _nested(f, hints)
        out.extend(setting_fields(nested, exclude) if nested else [f])
    return out


def _keys(f: dataclasses.Field, name: str) -> tuple[str, ...]:
    value = f.metadata.get(name)
    if value is None or value is False:
        return ()
    if value is True:
        return (f.name,)
    return (value,) if isinstance(value, str) else tuple(value)


def rerun_keys(cls, phase: str = "rerun", exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The settings keys that the fields of `cls` (nested dataclasses included) declare under `phase`: 'rerun'
    (what a rerun into the same folder must keep, known before any model loads), 'loaded' (the same, known once
    the models are loaded) or 'when_unused' (keys a run records as None when it does not use the setting)."""
    return tuple(dict.fromkeys(k for f in setting_fields(cls, exclude) for k in _keys(f, phase)))


def rerun_fields(cls, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The fields of `cls` (nested ones included) recorded under their own name as rerun keys."""
    return tuple(f.name for f in setting_fields(cls, exclude) if f.metadata.get("rerun") is True)


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
            except argparse.ArgumentTypeError as e:
                parser.error(f"{option_string}: {e}")
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
    """A list flag: `--flag a b` or `--flag a,b`; `choices` (or a `valid` predicate) checks each item, and so do
    the rules min, max, above, below (float items must be finite)."""
    rules = {k: kwargs.pop(k) for k in RANGE_KEYS if k in kwargs}
    if choices is not None:
        allowed = list(choices)
        valid = valid or (lambda item: item in allowed)
        valid_help = valid_help or "choose from " + ", ".join(map(str, allowed))
        kwargs.setdefault("metavar", "{" + ",".join(map(str, allowed)) + "}")
    action = group.add_argument(flag, action=ListAction, item_type=finite_float if item_type is float else item_type,
                                valid=valid, valid_help=valid_help, **kwargs)
    action.rules = rules
    return action


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
    """Add a `--name` flag per dataclass field (type, default, help, choices, range and spelling from the field:
    see `setting`); its rules are checked after parsing (a float's finiteness too). A field without a default is
    a required flag.

    bool fields become store_true flags (default False) or --name/--no-name; list fields take `a b` or `a,b`, or
    repeat the flag (`append`). `defaults` overrides defaults (e.g. None = "from the data"). Returns the field
    names added."""
    defaults, helps, flag_names = defaults or {}, helps or {}, flag_names or {}
    base = dataclass_defaults(cls)
    hints = typing.get_type_hints(cls)
    added = []
    for f in dataclasses.fields(cls):
        if (include is not None and f.name not in include) or f.name in exclude or not f.init:
            continue
        meta = f.metadata
        flag = "--" + flag_names.get(f.name, f.name)
        default = defaults.get(f.name, base.get(f.name))
        required = f.name not in base and f.name not in defaults
        help_text = helps.get(f.name, meta.get("help", f.name.replace("_", " ")))
        kind, is_list = _base_type(hints[f.name])
        kind = finite_float if kind is float else kind
        if kind is bool:
            if default:
                action = group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=True,
                                            help=help_text)
            else:
                action = group.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif is_list and meta.get("append"):
            action = group.add_argument(flag, dest=f.name, action="append", type=kind, default=default,
                                        required=required, help=help_text, metavar=meta.get("metavar"))
        elif is_list:
            metavar = meta.get("metavar") or (None if meta.get("choices") else f.name.upper())
            action = add_list_argument(group, flag, dest=f.name, item_type=kind, default=default, help=help_text,
                                       required=required, choices=meta.get("choices"), valid=meta.get("valid"),
                                       valid_help=meta.get("valid_help"), **({"metavar": metavar} if metavar else {}))
        else:
            action = group.add_argument(flag, dest=f.name, type=kind, default=default, help=help_text,
                                        required=required, choices=meta.get("choices"), metavar=meta.get("metavar"))
        action.rules = {k: meta[k] for k in RANGE_KEYS if k in meta}
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
