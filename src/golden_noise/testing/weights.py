"""Deterministic weights from key names, so that a model's forward can be compared with a reference implementation
through a small fixture (inputs and outputs) instead of a full state dict (tests/fixtures/npnet/).

The rule (`key_filled`): n = a standard normal tensor of the key's shape drawn from
torch.Generator().manual_seed(first 8 bytes of sha256(key), little-endian, as an int masked to 63 bits), then
    integer tensors                          zeros
    one element (NPNet's alpha, beta)        1 + 0.1 n
    key ending in running_var                exp(0.1 n)
    2 or more dimensions                     n / sqrt(prod(shape[1:]))   (fan-in scaled: activations stay O(1))
    1-D key ending in weight (norm scales)   1 + 0.1 n
    any other                                0.1 n
"""
from __future__ import annotations

import hashlib
import math
from typing import Mapping

import torch


def key_seed(key: str) -> int:
    """The generator seed of a state-dict key: sha256(key)'s first 8 bytes (little-endian) & (2**63 - 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & (2 ** 63 - 1)


def key_filled(key: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor the rule (module docstring) gives `key` for `shape` and `dtype`."""
    shape = tuple(int(s) for s in shape)
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    n = torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(key)), dtype=torch.float32)
    if n.numel() == 1:
        value = 1 + 0.1 * n
    elif key.endswith("running_var"):
        value = torch.exp(0.1 * n)
    elif n.dim() >= 2:
        value = n / math.sqrt(math.prod(shape[1:]))
    elif key.endswith("weight"):
        value = 1 + 0.1 * n
    else:
        value = 0.1 * n
    return value.to(dtype)


def filled_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{key: key_filled(key, its shape, its dtype)} for every tensor of a state dict."""
    return {k: key_filled(k, v.shape, v.dtype) for k, v in state.items()}


def reference_input(name: str, shape) -> torch.Tensor:
    """A fixture's input tensor: standard normal, drawn from the generator seeded by key_seed(name)."""
    return torch.randn(tuple(int(s) for s in shape), generator=torch.Generator().manual_seed(key_seed(name)))
