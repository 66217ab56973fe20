"""The ways of choosing an initial noise that stages 5, 6 and the sweep compare, and their folder names.

    standard    x_T itself: the image plain diffusers makes from the seed
    gnsnet      the trained RNN's rollout x-hat'_n from x_T (needs --rnn_weights_path)
    direct      the one-step baseline: the RNN's network predicting x'_n from x_T in one forward (--direct_weights)
    npnet       NPNet's network, x_T -> golden noise in one forward (--npnet_weights: ours trained, or NPNet's release)
    oracle      the real golden step applied n times to x_T (the upper bound the learned noises imitate)
    best_of_K   K standard samples from K deterministic seeds, the one a reward scores best kept
"""
from __future__ import annotations

import re

METHODS = ("standard", "gnsnet", "direct", "npnet", "oracle")   # fixed names, in display order; best_of_K follows
# the learned methods: the model type each loads and the flag (a job field) naming its export
LEARNED = {"gnsnet": ("NoiseSequenceRNN_v3", "rnn_weights_path"), "direct": ("DirectNoiseModel", "direct_weights"),
           "npnet": ("NPNet", "npnet_weights")}
ONE_STEP = ("direct", "npnet")  # learned methods that predict x'_n for their own n only
FOLDER_SUFFIX = "_output"
_BEST_OF = re.compile(r"^best_of_(\d+)$")


def best_of_k(name: str) -> int | None:
    """K of a 'best_of_K' method name, else None."""
    m = _BEST_OF.match(name)
    return int(m.group(1)) if m else None


def is_method(name: str) -> bool:
    """True for standard, gnsnet, direct, npnet, oracle and best_of_K with K >= 2."""
    k = best_of_k(name)
    return name in METHODS or (k is not None and k >= 2)


METHOD_HELP = "standard, gnsnet, direct, npnet, oracle or best_of_K (K >= 2)"


def folder(method: str) -> str:
    """A method's image folder under the output base dir: '{method}_output'."""
    return f"{method}{FOLDER_SUFFIX}"


def method_of_folder(name: str) -> str | None:
    """The method of a '{method}_output' folder name, else None."""
    return name[: -len(FOLDER_SUFFIX)] if name.endswith(FOLDER_SUFFIX) and len(name) > len(FOLDER_SUFFIX) else None


def order_key(method: str) -> tuple:
    """Sort key: standard, gnsnet, direct, npnet, oracle, then best_of_K by K, then other names alphabetically."""
    if method in METHODS:
        return (0, METHODS.index(method), "")
    k = best_of_k(method)
    return (1, k, "") if k is not None else (2, 0, method)
