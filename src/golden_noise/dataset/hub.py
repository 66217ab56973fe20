"""Datasets on the Hugging Face Hub: training from a hub dataset id (`resolve_dataset`)."""
from __future__ import annotations

from pathlib import Path

from ..io import looks_local


def resolve_dataset(name: str | Path) -> Path:
    """The local folder of a dataset: `name` itself when it is a path."""
    return Path(name)
