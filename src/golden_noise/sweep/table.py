"""sweep.csv: one row per (cell, metric) with the mean reward, the paired difference to `standard` at the same
guidance and steps and to the tuned guidance (the best `standard` of the grid at those steps), and the counted
cost. One bootstrap and one win-rate rule: golden_noise.stats."""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..io import atomic_write_text
from ..methods import best_of_k
from ..stats import bootstrap_ci, describe, paired_comparison, share_of_gain
from ..tables import format_table
from .grid import Cell, Unit
from .scores import UnitCost, UnitScores, cell_scores

COLUMNS = ("guidance_scale", "num_inference_steps", "num_gen_steps", "method", "metric", "n", "mean",
           "mean_ci_low", "mean_ci_high", "diff", "ci_low", "ci_high", "win_rate", "diff_vs_tuned",
           "ci_low_vs_tuned", "ci_high_vs_tuned", "win_rate_vs_tuned", "tuned_guidance_scale",
           "share_of_oracle_gain", "diff_vs_oracle", "ci_low_vs_oracle", "ci_high_vs_oracle",
           "unet_evals_per_image", "unet_rows_per_image", "rollout_unet_fraction", "reward_calls_per_image",
           "seconds_per_image", "selection_metric", "selection_bias")
NOTES = ("n = evaluated (prompt, seed) pairs; mean with its 95% bootstrap CI; diff = method - standard at the same "
         "guidance scale and steps, paired by prompt and seed, with its 95% percentile bootstrap CI "
         "(golden_noise.stats) and the win rate (ties count half); *_vs_tuned: the same against standard at "
         "tuned_guidance_scale, the grid's best standard guidance at those steps for that metric; gnsnet's "
         "share_of_oracle_gain = its diff / the oracle's at the same guidance, steps and n (empty, or — in the "
         "report, where the oracle's gain CI contains 0: a share of a gain that may be nothing means nothing), and "
         "*_vs_oracle its paired difference to the oracle's images; "
         "unet_evals_per_image = unet_rows_per_image (denoiser rows counted by a forward hook: 2 per sampling step "
         "with CFG, 1 without, 3 per golden step when w_w is 0 or 1; best_of_K: its K samplings) + "
         "rollout_unet_fraction (gnsnet: the RNN rollout's FLOPs / one denoiser evaluation's); seconds_per_image: "
         "noise + sampling, plus best_of_K's reward calls.")


@dataclass
class TableInputs:
    """What the table is computed from."""

    cells: list[Cell]
    scores: dict[tuple[Unit, str], UnitScores]
    costs: dict[Unit, UnitCost]
    rollout_fractions: dict[int, float]
    metrics: list[str]
    selection: str
    bootstrap_samples: int = 10000
    seed: int = 0


def selection_bias(cell: Cell, metric: str, selection: str) -> str:
    """best_of_K's caveat, in words beside its number."""
    if not best_of_k(cell.method):
        return ""
    if metric == selection:
        return (f"optimistic: the {cell.k} candidates were selected by {selection}, the same reward that evaluates "
                "them")
    return f"held-out reward: selected by {selection}, evaluated by {metric}"


def tuned_guidance(inputs: TableInputs, steps: int, metric: str) -> float:
    """The guidance scale of the best standard mean at `steps` (the smallest scale on a tie)."""
    standard = [c for c in inputs.cells if c.method == "standard" and c.num_inference_steps == steps]
    means = {c.guidance_scale: float(cell_scores(c, inputs.scores, metric, inputs.selection).mean())
             for c in standard}
    best = max(means.values())
    return min(w for w, m in means.items() if m == best)


def _paired(values, baseline, inputs: TableInputs, suffix: str = "") -> dict:
    p = paired_comparison(values, baseline, samples=inputs.bootstrap_samples, seed=inputs.seed)
    return {f"diff{suffix}": p["diff_mean"], f"ci_low{suffix}": p["ci95_low"], f"ci_high{suffix}": p["ci95_high"],
            f"win_rate{suffix}": p["win_rate"]}


def cell_cost(cell: Cell, inputs: TableInputs) -> dict:
    """The cost columns of a cell: its units' rows and seconds (+ the rollout's fraction, + best_of_K's reward)."""
    units = cell.units()
    rows = sum(inputs.costs[u].unet_evals for u in units)
    fraction = inputs.rollout_fractions[cell.num_gen_steps] if cell.method == "gnsnet" else 0.0
    seconds = sum(inputs.costs[u].seconds for u in units)
    calls = 0
    if best_of_k(cell.method):
        calls = len(units)
        n = len(inputs.scores[units[0], inputs.selection].scores)
        seconds += sum(inputs.scores[u, inputs.selection].seconds for u in units) / n
    return {"unet_evals_per_image": rows + fraction, "unet_rows_per_image": rows, "rollout_unet_fraction": fraction,
            "reward_calls_per_image": calls, "seconds_per_image": seconds}


def table_rows(inputs: TableInputs) -> list[dict]:
    """One dict per (cell, metric), metrics innermost; numbers as floats (None where not defined)."""
    rows = []
    tuned = {(s, m): tuned_guidance(inputs, s, m) for s in {c.num_inference_steps for c in inputs.cells}
             for m in inputs.metrics}
    for cell in inputs.cells:
        cost = cell_cost(cell, inputs)
        for metric in inputs.metrics:
            values = cell_scores(cell, inputs.scores, metric, inputs.selection)
            low, high = bootstrap_ci(values, samples=inputs.bootstrap_samples, seed=inputs.seed)
            row = dict.fromkeys(COLUMNS)
            row.update(guidance_scale=cell.guidance_scale, num_inference_steps=cell.num_inference_steps,
                       num_gen_steps=cell.num_gen_steps, method=cell.method, metric=metric,
                       n=describe(values)["n"], mean=describe(values)["mean"], mean_ci_low=low, mean_ci_high=high,
                       selection_metric=inputs.selection if best_of_k(cell.method) else None,
                       selection_bias=selection_bias(cell, metric, inputs.selection), **cost)
            if cell.method != "standard":
                row.update(_paired(values, cell_scores(cell.baseline(), inputs.scores, metric, inputs.selection),
                                   inputs))
            if cell.method == "gnsnet" and (oracle := _oracle_of(cell, inputs)) is not None:
                p = paired_comparison(values, cell_scores(oracle, inputs.scores, metric, inputs.selection),
                                      samples=inputs.bootstrap_samples, seed=inputs.seed)
                row.update(diff_vs_oracle=p["diff_mean"], ci_low_vs_oracle=p["ci95_low"],
                           ci_high_vs_oracle=p["ci95_high"])
            w = tuned[cell.num_inference_steps, metric]
            row["tuned_guidance_scale"] = w
            if not (cell.method == "standard" and cell.guidance_scale == w):
                ref = Cell(w, cell.num_inference_steps, "standard")
                row.update(_paired(values, cell_scores(ref, inputs.scores, metric, inputs.selection), inputs,
                                   "_vs_tuned"))
            rows.append(row)
    _oracle_shares(rows)
    return rows


def _oracle_of(cell: Cell, inputs: TableInputs) -> Cell | None:
    """The oracle cell at a gnsnet cell's guidance, steps and n, if the grid has it."""
    oracle = Cell(cell.guidance_scale, cell.num_inference_steps, "oracle", cell.num_gen_steps)
    return oracle if oracle in inputs.cells else None


def _oracle_shares(rows: list[dict]) -> None:
    """gnsnet's share_of_oracle_gain: its diff / the oracle's at the same guidance, steps, n and metric; None
    (an empty cell) where the oracle's gain CI contains 0 (stats.share_of_gain)."""
    key = lambda r: (r["guidance_scale"], r["num_inference_steps"], r["num_gen_steps"], r["metric"])  # noqa: E731
    oracle = {key(r): r for r in rows if r["method"] == "oracle"}
    for r in rows:
        if r["method"] == "gnsnet" and (o := oracle.get(key(r))) is not None:
            r["share_of_oracle_gain"] = share_of_gain(r["diff"], o["diff"], (o["ci_low"], o["ci_high"]))


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """sweep.csv: COLUMNS, full float precision, empty where a value is not defined."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([_cell(r[c]) for c in COLUMNS])
    atomic_write_text(path, buf.getvalue())


def _signed(x, digits: int = 4) -> str:
    return "" if x is None else f"{x:+.{digits}f}"


def text_table(rows: Sequence[dict]) -> str:
    """The sweep's results as an aligned text table (golden_noise.tables)."""
    header = ["steps", "guidance", "method", "n", "metric", "mean", "diff vs standard [95% CI]", "win",
              "vs tuned (w) [95% CI]", "UNet evals/img", "s/img"]
    body = []
    for r in rows:
        diff = "(baseline)" if r["diff"] is None else \
            f"{_signed(r['diff'])} [{_signed(r['ci_low'])}, {_signed(r['ci_high'])}]"
        tuned = f"(tuned, w={r['tuned_guidance_scale']:g})" if r["diff_vs_tuned"] is None else \
            f"{_signed(r['diff_vs_tuned'])} [{_signed(r['ci_low_vs_tuned'])}, {_signed(r['ci_high_vs_tuned'])}]"
        body.append([r["num_inference_steps"], f"{r['guidance_scale']:g}", r["method"],
                     "" if r["num_gen_steps"] is None else r["num_gen_steps"], r["metric"], f"{r['mean']:.4f}", diff,
                     "" if r["win_rate"] is None else f"{100 * r['win_rate']:.1f}%", tuned,
                     f"{r['unet_evals_per_image']:.2f}", f"{r['seconds_per_image']:.4f}"])
    return format_table(body, header=header, align_right=(0, 1, 3, 5, 9, 10))
