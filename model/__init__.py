"""The noise models and the registry every loader dispatches on.

An export's JSON names its `model_type` (absent: "rnn_v3", the exports made before there was a choice):
    rnn_v3   NoiseSequenceRNN_v3, the CNN + GRU rolled out n steps (gnsnet)
    direct   DirectNoiseModel, the same network predicting x'_n from x_T in one step (no recurrence)
    npnet    NPNet, the noise prompt network of arXiv:2411.09502 (its released SDXL checkpoint loads too)
Each class takes its config dataclass (`config_class`) as its only constructor argument and has `save_pretrained`,
`from_pretrained` and `generate_sequence`; the one-step models set `one_step = True`.
"""
from __future__ import annotations

import importlib
import json
import os

DEFAULT_MODEL_TYPE = "rnn_v3"
# model_type -> (module, class); imported on first use (npnet needs timm)
MODEL_TYPES = {
    "rnn_v3": ("golden_noise.model.rnn_seq_model_v3", "NoiseSequenceRNN_v3"),
    "direct": ("golden_noise.model.direct", "DirectNoiseModel"),
    "npnet": ("golden_noise.model.npnet", "NPNet"),
}


def model_class(model_type: str):
    """The model class registered as `model_type`."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}: choose from {', '.join(MODEL_TYPES)}")
    module, name = MODEL_TYPES[model_type]
    return getattr(importlib.import_module(module), name)


def config_class(model_type: str):
    """The config dataclass of `model_type` (the direct model shares NoiseSequenceRNN_v3's)."""
    cls = model_class(model_type)
    if model_type == "rnn_v3":
        from .rnn_seq_model_v3 import NoiseSequenceRNNConfig

        return NoiseSequenceRNNConfig
    return cls.config_class


def model_type_of(meta: dict) -> str:
    """The model type an export's JSON metadata names (absent: rnn_v3)."""
    return meta.get("model_type") or DEFAULT_MODEL_TYPE


def is_one_step(model_type: str) -> bool:
    """True for the models that predict x'_n in one forward (direct, npnet)."""
    return bool(getattr(model_class(model_type), "one_step", False))


def load_export(path: str | os.PathLike, device=None, dtype=None, expect: str | None = None, label: str | None = None):
    """(model in eval mode, JSON metadata) of any export (the .safetensors, the .json, their stem or the run
    directory), built by the class its `model_type` names; `expect`: refuse another model type, naming the export
    as `label` (default: "the export PATH")."""
    from ..errors import UserError
    from .rnn_seq_model_v3 import resolve_export_paths

    _, meta_path = resolve_export_paths(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"invalid model config {meta_path}: {type(e).__name__}: {e}") from None
    model_type = model_type_of(meta) if isinstance(meta, dict) else DEFAULT_MODEL_TYPE
    if model_type not in MODEL_TYPES:
        raise UserError(f"{meta_path} names model_type {model_type!r}, which this version does not know "
                        f"({', '.join(MODEL_TYPES)})")
    if expect is not None and model_type != expect:
        raise UserError(f"{label or f'the export {path}'} is a {model_type} export, not {expect}: pass a {expect} "
                        f"export (train_rnn_model_v3.py --model_type {expect})")
    return model_class(model_type).from_pretrained(path, device=device, dtype=dtype)
