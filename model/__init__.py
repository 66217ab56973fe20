"""The noise models (installed as `golden_noise.model`) and their registry: an export's config names its class by
`model_type` (absent: NoiseSequenceRNN_v3, every export made before other model types existed).

Each registered class is an nn.Module whose only constructor argument is its config dataclass (`config_class`,
with `to_dict`/`from_dict`), with a `model_type` attribute equal to its registry key; golden_noise.export saves and
loads any of them (`ExportableModel`). Register a new one here: name -> (module, class), imported only when used."""
from __future__ import annotations

import importlib

DEFAULT_MODEL_TYPE = "NoiseSequenceRNN_v3"
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "NoiseSequenceRNN_v3": ("golden_noise.model.rnn_seq_model_v3", "NoiseSequenceRNN_v3"),
}


def model_class(model_type: str | None = None) -> type:
    """The class registered as `model_type` (None: DEFAULT_MODEL_TYPE); KeyError naming the known types."""
    name = DEFAULT_MODEL_TYPE if model_type is None else model_type
    if name not in MODEL_TYPES:
        raise KeyError(f"unknown model_type {name!r}: this version knows {', '.join(MODEL_TYPES)}")
    module, attr = MODEL_TYPES[name]
    return getattr(importlib.import_module(module), attr)
