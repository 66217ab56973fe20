"""The noise models (installed as `golden_noise.model`) and their registry: an export's config names its class by
`model_type` (absent: NoiseSequenceRNN_v3, every export made before other model types existed).

    NoiseSequenceRNN_v3  the CNN + GRU rolled out n steps (the method gnsnet)
    DirectNoiseModel     the same network predicting x'_n from x_T in one step, no recurrence (the method direct)
    NPNet                the noise prompt network of arXiv:2411.09502; its released SDXL checkpoint loads too (npnet)
The one-step models (direct, NPNet) set `one_step = True`.

Each registered class is an nn.Module whose only constructor argument is its config dataclass (`config_class`,
with `to_dict`/`from_dict`), with a `model_type` attribute equal to its registry key; golden_noise.export saves and
loads any of them (`ExportableModel`). Register a new one here: name -> (module, class), imported only when used."""
from __future__ import annotations

import importlib

DEFAULT_MODEL_TYPE = "NoiseSequenceRNN_v3"
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "NoiseSequenceRNN_v3": ("golden_noise.model.rnn_seq_model_v3", "NoiseSequenceRNN_v3"),
    "DirectNoiseModel": ("golden_noise.model.direct", "DirectNoiseModel"),
    "NPNet": ("golden_noise.model.npnet", "NPNet"),  # needs timm
}


def model_class(model_type: str | None = None) -> type:
    """The class registered as `model_type` (None: DEFAULT_MODEL_TYPE); KeyError naming the known types."""
    name = DEFAULT_MODEL_TYPE if model_type is None else model_type
    if name not in MODEL_TYPES:
        raise KeyError(f"unknown model_type {name!r}: this version knows {', '.join(MODEL_TYPES)}")
    module, attr = MODEL_TYPES[name]
    return getattr(importlib.import_module(module), attr)


def model_type_of(meta: dict) -> str:
    """The model type an export's config document names (absent: DEFAULT_MODEL_TYPE)."""
    return meta.get("model_type") or DEFAULT_MODEL_TYPE


def is_one_step(model_type: str | None) -> bool:
    """True for the models that predict x'_n in one forward (DirectNoiseModel, NPNet)."""
    return bool(getattr(model_class(model_type), "one_step", False))
