"""The README's "Does the sequence matter?" tables, from what scripts/baselines_toy.sh wrote: the sweeps' sweep.csv
(gains with 95% CIs, shares of the oracle's gain, matched-compute comparisons) and each training run's
validation.json and export (held-out explained fraction, parameters, FLOPs per rollout counted on the meta device)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from golden_noise.errors import UserError
from golden_noise.inference import GoldenNoise
from golden_noise.stats import paired_comparison, share_of_gain
from golden_noise.sweep.cost import rollout_flops
from golden_noise.sweep.grid import Unit
from golden_noise.sweep.scores import scores_path
from golden_noise.tables import markdown_table

METHOD_OF = {"rnn_v3": "gnsnet", "direct": "direct", "npnet": "npnet"}


def read_sweep(path: Path) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except OSError as e:
        raise UserError(f"cannot read {path} ({e}): run scripts/baselines_toy.sh first") from None


def cell(rows: Sequence[dict], method: str, w: float, steps: int, n: int | None = None,
         metric: str = "toy_attributes") -> dict | None:
    """The sweep.csv row of one cell, or None."""
    for r in rows:
        if (r["method"], float(r["guidance_scale"]), int(r["num_inference_steps"]), r["metric"]) == \
                (method, w, steps, metric) and r["num_gen_steps"] == ("" if n is None else str(n)):
            return r
    return None


def _num(r: dict, key: str) -> float | None:
    return float(r[key]) if r and r.get(key) not in (None, "") else None


def gain(r: dict | None, suffix: str = "") -> str:
    """'+0.0123 [+0.0050, +0.0190]' of a row's diff{suffix} and its CI."""
    d = _num(r, f"diff{suffix}")
    if d is None:
        return "—"
    return f"{d:+.4f} [{_num(r, f'ci_low{suffix}'):+.4f}, {_num(r, f'ci_high{suffix}'):+.4f}]"


def share(rows: Sequence[dict], r: dict | None) -> str:
    """A learned cell's share of the oracle's gain at the same guidance, steps, n and metric (stats.share_of_gain:
    '—' where the oracle's gain CI contains 0), recomputed from the rows."""
    if r is None:
        return "—"
    o = cell(rows, "oracle", float(r["guidance_scale"]), int(r["num_inference_steps"]),
             int(r["num_gen_steps"]) if r["num_gen_steps"] else None, r["metric"])
    s = share_of_gain(_num(r, "diff"), _num(o, "diff"), (_num(o, "ci_low"), _num(o, "ci_high")) if o else None)
    return "—" if s is None else f"{100 * s:.0f}%"


def grid(rows: Sequence[dict]) -> list[tuple[int, float]]:
    """(steps, guidance) of the golden-noise cells, in the sweep's order."""
    return list(dict.fromkeys((int(r["num_inference_steps"]), float(r["guidance_scale"])) for r in rows
                              if r["method"] == "oracle"))


def gains_table(rows: Sequence[dict], n: int) -> str:
    """Per (steps, guidance): standard's mean, the oracle's gain at n, and each learned noise's gain and share."""
    body = []
    for s, w in grid(rows):
        std, oracle = cell(rows, "standard", w, s), cell(rows, "oracle", w, s, n)
        row = [s, f"{w:g}", f"{float(std['mean']):.4f}", gain(oracle)]
        for method in ("gnsnet", "direct", "npnet"):
            r = cell(rows, method, w, s, n)
            row.append(f"{gain(r)} ({share(rows, r)})")
        body.append(row)
    head = ["steps", "guidance", "standard", f"oracle n = {n} gain", f"gnsnet n = {n} gain (share of oracle)",
            "direct gain (share)", "npnet gain (share)"]
    return markdown_table(body, head)


def cell_scores(results: Path, method: str, w: float, steps: int, n: int, metric: str = "toy_attributes"):
    """The per-pair scores a sweep stored for one cell (its unit's sweep.scores.scores_path)."""
    path = scores_path(Unit(float(w), int(steps), method, int(n)), results, metric)
    try:
        return np.asarray(json.loads(path.read_text(encoding="utf-8"))["scores"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {path} ({e}): run scripts/baselines_toy.sh first") from None


def versus_table(rows: Sequence[dict], sweep_dirs: dict[str, Path], n: int, pairs=(("direct", "gnsnet"),
                                                                                       ("npnet", "gnsnet"))) -> str:
    """Paired differences between learned noises (e.g. direct − gnsnet), by (caption, seed), with 95% CIs."""
    body = []
    for fraction, folder in sweep_dirs.items():
        for s, w in grid(read_sweep(folder / "sweep.csv")):
            if w != 1.0 and fraction != "1.0":
                continue
            row = [fraction, s, f"{w:g}"]
            for a, b in pairs:
                p = paired_comparison(cell_scores(folder, a, w, s, n), cell_scores(folder, b, w, s, n),
                                      samples=10000, seed=0)
                row.append(f"{p['diff_mean']:+.4f} [{p['ci95_low']:+.4f}, {p['ci95_high']:+.4f}]")
            body.append(row)
    head = ["training fraction", "steps", "guidance", *(f"{a} − {b} [95% CI]" for a, b in pairs)]
    return markdown_table(body, head)


def rollout_table(rows: Sequence[dict], ns: Sequence[int]) -> str:
    """gnsnet against the oracle at each rollout length n (every (steps, guidance))."""
    body = []
    for s, w in grid(rows):
        for n in ns:
            g, o = cell(rows, "gnsnet", w, s, n), cell(rows, "oracle", w, s, n)
            if g is None or o is None:
                continue
            body.append([s, f"{w:g}", n, gain(o), gain(g), share(rows, g),
                         f"{_num(g, 'diff_vs_oracle'):+.4f} [{_num(g, 'ci_low_vs_oracle'):+.4f}, "
                         f"{_num(g, 'ci_high_vs_oracle'):+.4f}]"])
    head = ["steps", "guidance", "n", "oracle gain", "gnsnet gain", "share", "gnsnet − oracle [95% CI]"]
    return markdown_table(body, head)


def matched_table(rows: Sequence[dict], n: int, best_of: str = "best_of_4") -> str:
    """Each golden-noise cell against standard noise at matched compute (sweep.table's rule)."""
    body = []
    for s, w in grid(rows):
        for method, mn in (("gnsnet", n), ("direct", n), ("npnet", n), ("oracle", n), (best_of, None)):
            r = cell(rows, method, w, s, mn)
            if r is None:
                continue
            if _num(r, "diff_vs_matched") is None:
                where = "none of the grid costs as much"
            else:
                where = (f"w={float(r['matched_guidance_scale']):g}, {r['matched_num_inference_steps']} steps "
                         f"({float(r['matched_unet_evals_per_image']):g}; {r['matched_rule']})")
            body.append([s, f"{w:g}", method + (f" n={mn}" if mn else ""), f"{float(r['unet_evals_per_image']):.2f}",
                         f"{float(r['mean']):.4f}", where, gain(r, "_vs_matched")])
    head = ["steps", "guidance", "method", "UNet evals / image", "mean",
            "standard noise at matched compute (evals; how)",
            "method − matched [95% CI]"]
    return markdown_table(body, head)


def model_facts(run: Path) -> dict:
    """Parameters, FLOPs per rollout (meta-device count) and the held-out explained fraction of one training run."""
    try:
        summary = json.loads((run / "validation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run / 'validation.json'} ({e}): run scripts/baselines_toy.sh first") from None
    gn = GoldenNoise.from_pretrained(run)
    report = summary["validation"]
    n = report["num_steps"]
    return {"parameters": summary["parameters"], "train_samples": summary["train_samples"],
            "validation_samples": report["num_samples"], "flops": rollout_flops(gn, n), "num_steps": n,
            "explained": {s["step"]: s["explained_fraction"] for s in report["rollout"]["per_step"]}}


def models_table(facts: dict[str, dict], rows: Sequence[dict]) -> str:
    """Parameters, FLOPs per rollout (also in toy-UNet evaluations, from sweep.csv) and the explained fractions."""
    body = []
    for model, f in facts.items():
        method = METHOD_OF[model]
        fractions = {int(r["num_gen_steps"]): float(r["rollout_unet_fraction"]) for r in rows
                     if r["method"] == method and r["num_gen_steps"]}
        n = f["num_steps"]
        explained = ", ".join(f"step {k}: {100 * v:.1f}%" for k, v in sorted(f["explained"].items()))
        body.append([method, f"{f['parameters'] / 1e6:.3f}M", f"{f['flops'] / 1e6:.1f}M",
                     f"{fractions.get(n, float('nan')):.3f}", explained])
    head = ["method", "parameters", f"FLOPs per rollout (n = {n})", "in UNet evaluations",
            "explained fraction of the golden change, held-out sequences"]
    return markdown_table(body, head)


def data_table(facts: dict[tuple[str, str], dict], sweeps: dict[str, list[dict]], n: int) -> str:
    """Per training fraction and learned method: training sequences, held-out explained fraction at step n, and
    the gain and share of the oracle's gain at w = 1 (4 and 20 steps)."""
    body = []
    for fraction, rows in sweeps.items():
        for model in ("rnn_v3", "direct", "npnet"):
            f = facts[model, fraction]
            method = METHOD_OF[model]
            row = [fraction, f["train_samples"], method, f"{100 * f['explained'][n]:.1f}%"]
            for s in (4, 20):
                r = cell(rows, method, 1.0, s, n)
                row.append(f"{gain(r)} ({share(rows, r)})")
            body.append(row)
    head = ["fraction", "training sequences", "method", f"explained at step {n}", "gain at 4 steps, w = 1 (share)",
            "gain at 20 steps, w = 1 (share)"]
    return markdown_table(body, head)


def summary(results_dir: str | Path, runs_dir: str | Path, fractions: Sequence[str], num_steps: int) -> str:
    """Every table of the README section, as markdown."""
    results, runs = Path(results_dir), Path(runs_dir)
    rows = read_sweep(results / "sweep" / "sweep.csv")
    full = max(fractions, key=float)
    sweeps = {f: rows if f == full else read_sweep(results / f"data_f{f}" / "sweep.csv")
              for f in sorted(fractions, key=float)}
    facts = {(m, f): model_facts(runs / f"{m}_f{f}") for m in METHOD_OF for f in fractions}
    parts = [f"Learned noise vs the oracle at n = {num_steps} "
             "(gain over standard [95% CI], share of the oracle's gain):",
             gains_table(rows, num_steps),
             "gnsnet against the oracle at each rollout length:", rollout_table(rows, sorted(
                 {int(r["num_gen_steps"]) for r in rows if r["method"] == "gnsnet"})),
             "Learned noises against each other, paired by (caption, seed):",
             versus_table(rows, {f: results / ("sweep" if f == full else f"data_f{f}") for f in
                                 sorted(fractions, key=float, reverse=True)}, num_steps),
             "Each golden-noise cell against standard noise at matched compute:", matched_table(rows, num_steps),
             "The models (trained on 100% of the sequences):",
             models_table({m: facts[m, full] for m in METHOD_OF}, rows),
             "Data efficiency (each model trained on a fraction of the sequences):",
             data_table(facts, sweeps, num_steps)]
    return "\n\n".join(parts)
