"""report.html of a sweep: what was run, plain findings, the table per metric (best_of_K's selection caveat beside
its number), the plots, and a few image rows per (guidance, steps). One HTML file linking the plots and images
beside it, like golden_noise.report's."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..io import atomic_write_text
from ..methods import LEARNED
from ..report import _CSS, _rel, diff_class
from .plots import pareto
from .table import NOTES


def _f(x, digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _where(r: dict) -> str:
    n = f", n={r['num_gen_steps']}" if r["num_gen_steps"] is not None else ""
    return f"w={r['guidance_scale']:g}, {r['num_inference_steps']} steps{n}"


def findings(rows: Sequence[dict]) -> list[str]:
    """Plain sentences per metric: where the gain's CI excludes 0, how each learned noise compares with the oracle,
    with the tuned guidance and with standard noise at matched compute, and where best_of_K sits."""
    out = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        rs = [r for r in rows if r["metric"] == metric]
        for method in dict.fromkeys(r["method"] for r in rs if r["method"] != "standard"):
            mine = [r for r in rs if r["method"] == method]
            up = [_where(r) for r in mine if r["ci_low"] > 0]
            down = [_where(r) for r in mine if r["ci_high"] < 0]
            tuned = [_where(r) for r in mine if r["ci_low_vs_tuned"] is not None and r["ci_low_vs_tuned"] > 0]
            matched = [_where(r) for r in mine if r.get("ci_low_vs_matched") is not None and r["ci_low_vs_matched"] > 0]
            text = (f"{metric}, {method}: gain vs standard with a 95% CI above 0 at {'; '.join(up) or 'no cell'}"
                    f"{'; below 0 at ' + '; '.join(down) if down else ''}; beats standard at the tuned guidance at "
                    f"{'; '.join(tuned) or 'no cell'}; beats standard noise at matched compute at "
                    f"{'; '.join(matched) or 'no cell'}.")
            if method.startswith("best_of") and mine and mine[0]["selection_bias"]:
                text += f" ({mine[0]['selection_bias']}.)"
            out.append(text)
        oracle_up = {(r["guidance_scale"], r["num_inference_steps"], r["num_gen_steps"]) for r in rs
                     if r["method"] == "oracle" and r["ci_low"] > 0}
        for method in LEARNED:
            kept = [f"{_where(r)}: {100 * r['share_of_oracle_gain']:.0f}%" for r in rs
                    if r["method"] == method and r["share_of_oracle_gain"] is not None
                    and (r["guidance_scale"], r["num_inference_steps"], r["num_gen_steps"]) in oracle_up]
            if kept:
                out.append(f"{metric}: where the oracle's gain CI excludes 0, {method} keeps {', '.join(kept)} of it.")
        front = pareto([(r["unet_evals_per_image"], r["mean"]) for r in rs])
        on = [f"{r['method']} {_where(r)} ({r['unet_evals_per_image']:.1f} UNet evals, {r['mean']:.4f})" for r in rs
              if (r["unet_evals_per_image"], r["mean"]) in front]
        out.append(f"{metric}: on the cost frontier (no cheaper or equal cell scores higher): {'; '.join(on)}.")
    return out


@dataclass
class ImageRows:
    """The image rows of one (guidance, steps): per column (a cell's label) the image and score of each prompt."""

    guidance_scale: float
    num_inference_steps: int
    columns: list[str]
    indices: list[int]
    files: dict[str, dict[int, Path]] = field(default_factory=dict)
    scores: dict[str, dict[int, float]] = field(default_factory=dict)


def _table(rows: Sequence[dict]) -> list[str]:
    head = ["steps", "w", "method", "n", "mean [95% CI]", "diff vs standard [95% CI]", "win rate",
            "vs tuned guidance [95% CI]", "vs matched compute [95% CI]", "oracle share", "UNet evals / image",
            "s / image", "note"]
    out = ["<table class='summary'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        diff = "(baseline)" if r["diff"] is None else \
            f"{_f(r['diff'], signed=True)} [{_f(r['ci_low'], signed=True)}, {_f(r['ci_high'], signed=True)}]"
        tuned = f"(tuned: w={r['tuned_guidance_scale']:g})" if r["diff_vs_tuned"] is None else \
            (f"{_f(r['diff_vs_tuned'], signed=True)} [{_f(r['ci_low_vs_tuned'], signed=True)}, "
             f"{_f(r['ci_high_vs_tuned'], signed=True)}] vs w={r['tuned_guidance_scale']:g}")
        cls = diff_class(r["diff"]) if r["diff"] is not None and (r["ci_low"] > 0 or r["ci_high"] < 0) else "num"
        matched = "" if r.get("diff_vs_matched") is None else (
            f"{_f(r['diff_vs_matched'], signed=True)} [{_f(r['ci_low_vs_matched'], signed=True)}, "
            f"{_f(r['ci_high_vs_matched'], signed=True)}] vs standard w={r['matched_guidance_scale']:g}, "
            f"{r['matched_num_inference_steps']} steps ({r['matched_unet_evals_per_image']:.1f} evals; "
            f"{r['matched_rule']})")
        if r["method"] != "standard" and r.get("diff_vs_matched") is None:
            matched = "no standard cell of the grid costs as much"
        cells = [str(r["num_inference_steps"]), f"{r['guidance_scale']:g}", r["method"],
                 "" if r["num_gen_steps"] is None else str(r["num_gen_steps"]),
                 f"{_f(r['mean'])} [{_f(r['mean_ci_low'])}, {_f(r['mean_ci_high'])}]", diff,
                 "" if r["win_rate"] is None else f"{100 * r['win_rate']:.1f}%", tuned, matched,
                 "" if r["share_of_oracle_gain"] is None else f"{100 * r['share_of_oracle_gain']:.0f}%",
                 f"{r['unet_evals_per_image']:.2f}", f"{r['seconds_per_image']:.4f}", r["selection_bias"]]
        klass = ["num", "num", "", "num", "num", cls, "num", "num", "note", "num", "num", "num", "note"]
        out.append("<tr>" + "".join(f"<td class='{k}'>{html.escape(c)}</td>" for k, c in zip(klass, cells)) + "</tr>")
    out.append("</table>")
    return out


def _image_rows(block: ImageRows, root: Path, metric: str) -> list[str]:
    esc = html.escape
    out = [f"<h3>w = {block.guidance_scale:g}, {block.num_inference_steps} steps</h3><table><tr><th>index</th>"]
    out += [f"<th>{esc(c)}</th>" for c in block.columns]
    out.append("</tr>")
    for i in block.indices:
        out.append(f"<tr><td class='num'>{i}</td>")
        for c in block.columns:
            src = _rel(block.files[c][i], root)
            out.append(f"<td><figure><a href='{src}'><img loading='lazy' src='{src}' alt='{esc(c)} {i}'></a>"
                       f"<figcaption>{esc(metric)} {block.scores[c][i]:.4f}</figcaption></figure></td>")
        out.append("</tr>")
    out.append("</table>")
    return out


def write_report(path: Path, rows: Sequence[dict], plots: Sequence[Path], images: Sequence[ImageRows],
                 prompts: dict[int, str], title: str, subtitle: str) -> None:
    """Write report.html (findings, a table per metric, plots, image rows with their prompts)."""
    esc, root = html.escape, path.parent
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_CSS}td.note{{max-width:320px;white-space:normal}}</style></head><body>",
           f"<h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p><h2>Findings</h2><ul>"]
    out += [f"<li>{esc(s)}</li>" for s in findings(rows)] + ["</ul>"]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    for metric in metrics:
        out.append(f"<h2>{esc(metric)}</h2>")
        out += _table([r for r in rows if r["metric"] == metric])
    out.append(f"<p class='note'>{esc(NOTES)}</p><h2>Plots</h2><div class='plots'>")
    out += [f"<a href='{_rel(p, root)}'><img src='{_rel(p, root)}' alt='{esc(p.name)}'></a>" for p in plots]
    out.append("</div><p class='note'>reward_vs_guidance: mean reward per method against the sampling guidance "
               "scale (bands: 95% CIs), and below it the gain over standard at the same guidance; reward_vs_cost: "
               "every cell at its counted cost, the dashed line is the frontier (the best reward any cell reaches "
               "at or below that cost); gain_vs_rollout: the gain over standard against the rollout length n.</p>")
    if images:
        out.append(f"<h2>Images</h2><p class='note'>Same prompt and seed across a row; best_of_K shows the "
                   f"candidate it kept; captions: {esc(metrics[0])}. Prompts: " + "; ".join(
                       f"{i}: {esc(prompts[i])}" for i in images[0].indices) + "</p>")
        for block in images:
            out += _image_rows(block, root, metrics[0])
    out.append("</body></html>\n")
    atomic_write_text(path, "\n".join(out))
