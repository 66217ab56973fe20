"""The quickstart's closing table (standard vs gnsnet vs oracle) and its image grid."""
from __future__ import annotations

import json
from pathlib import Path

from golden_noise.errors import UserError
from golden_noise.inference.batch import RUN_FILE
from golden_noise.io import atomic_save_image
from golden_noise.methods import METHODS, folder
from golden_noise.stats import share_of_gain
from golden_noise.tables import format_table


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): run the quickstart's earlier stages first") from None


def summary_table(results_dir: str | Path, run_dir: str | Path, images_dir: str | Path,
                  metric: str = "toy_attributes") -> tuple[str, dict]:
    """Mean reward, gain over standard with its 95% CI, win rate, share of the oracle's gain ('—' where the oracle's
    gain CI contains 0) and the noise's cost (batch inference's run.json: a wall-clock ratio)."""
    evaluation = _load(Path(results_dir) / "summary.json")["results"][metric]
    inference = _load(Path(images_dir) / RUN_FILE)["methods"]
    validation = _load(Path(run_dir) / "validation.json")["validation"]
    oracle = evaluation.get("oracle", {})
    rows = [("method", f"mean {metric}", "gain vs standard [95% CI]", "win rate", "share of oracle gain",
             "noise cost / sampling")]
    facts = {"metric": metric, "methods": {}}
    for method in METHODS:
        if method not in evaluation:
            continue
        r = evaluation[method]
        cost = inference.get(method, {}).get("noise_over_sampling")
        if method == "standard":
            rows.append((method, f"{r['mean']:.4f}", "(baseline)", "", "", "0"))
        else:
            share = share_of_gain(r["diff_mean"], oracle.get("diff_mean"),
                                  (oracle["ci95_low"], oracle["ci95_high"]) if oracle else None)
            rows.append((method, f"{r['mean']:.4f}", f"{r['diff_mean']:+.4f} [{r['ci95_low']:+.4f}, {r['ci95_high']:+.4f}]",
                         f"{100 * r['win_rate']:.1f}%", "—" if share is None else f"{100 * share:.0f}%",
                         f"{cost:.3f}" if cost is not None else "?"))
        facts["methods"][method] = {**r, "noise_over_sampling": cost}
    final = validation["final_step"]
    facts["validation_explained_fraction"] = final["explained_fraction"]
    facts["validation_samples"] = validation["num_samples"]
    lines = [format_table(rows[1:], header=rows[0])]
    lines.append(f"validation: the RNN explains {100 * final['explained_fraction']:.1f}% of the golden change at step "
                 f"n={final['step']} on {validation['num_samples']} held-out sequences (rollout vs x_T unchanged)")
    return "\n".join(lines), facts


def image_grid(images_dir: str | Path, indices: list[int], path: str | Path, scale: int = 3,
               methods=METHODS) -> Path:
    """A grid image: one row per method, one column per prompt index, each image upscaled `scale`x."""
    from PIL import Image

    images_dir = Path(images_dir)
    tiles = [[Image.open(images_dir / folder(m) / f"{i}.png").convert("RGB") for i in indices] for m in methods]
    w, h = tiles[0][0].size
    w, h = w * scale, h * scale
    gap = 2
    grid = Image.new("RGB", (len(indices) * (w + gap) - gap, len(methods) * (h + gap) - gap), "white")
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            grid.paste(tile.resize((w, h), Image.NEAREST), (c * (w + gap), r * (h + gap)))
    atomic_save_image(grid, path)
    return Path(path)
