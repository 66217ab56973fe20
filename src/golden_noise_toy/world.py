"""A built toy world's card: `world.json` (preset, seed, accuracies, timings, and the student's card once distilled),
read by the builder, the student and the probes alike."""
from __future__ import annotations

import json
from pathlib import Path

from golden_noise.errors import UserError

WORLD_CARD = "world.json"


def load_world_card(world: str | Path) -> dict:
    """The world's world.json (preset, seed, accuracies, timings)."""
    path = Path(world) / WORLD_CARD
    if not path.is_file():
        raise UserError(f"{world} is not a toy world (no {WORLD_CARD}): build one with scripts/build_toy_world.py")
    return json.loads(path.read_text(encoding="utf-8"))
