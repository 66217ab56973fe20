"""Saving and loading the exports of the noise models other than NoiseSequenceRNN_v3 (which keeps its own methods):
`{stem}.safetensors` (float32 weights, the model's name and config in the header) and `{stem}.json`
({"model_type", "model_config", **extra}); loaders dispatch on `model_type` (golden_noise.model.MODEL_TYPES)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .rnn_seq_model_v3 import resolve_export_paths, save_safetensors_bytes


def save_export(model: torch.nn.Module, stem_path: str | os.PathLike, model_type: str,
                extra: dict | None = None) -> tuple[Path, Path]:
    """Write `{stem}.safetensors` and `{stem}.json` of `model` (its `config.to_dict()` is the model config)."""
    from golden_noise.io import atomic_path, atomic_write_json

    stem = Path(stem_path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    weights, meta = stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    blob = save_safetensors_bytes(state, {"format": "pt", "model": type(model).__name__, "model_type": model_type,
                                          "model_config": json.dumps(config)})
    with atomic_path(weights) as tmp:
        tmp.write_bytes(blob)
    atomic_write_json(meta, {"model_type": model_type, "model_config": config, **(extra or {})})
    return weights, meta


def load_export(cls, path: str | os.PathLike, device=None, dtype=None):
    """(model of class `cls` in eval mode, the JSON metadata) from an export written by `save_export`; a missing
    file, an invalid config or weights of another architecture is a UserError naming the file."""
    from safetensors.torch import load_file

    from golden_noise.errors import UserError

    weights, meta_path = resolve_export_paths(path)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        config = cls.config_class.from_dict(meta["model_config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"invalid model config {meta_path}: {type(e).__name__}: {e}") from None
    model = cls(config)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except Exception as e:  # a corrupt file or weights of another architecture
        raise UserError(f"cannot load model weights {weights}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:300]}") from None
    model.to(device=device, dtype=dtype)
    return model.eval(), meta
