"""report.html of a sweep: what was run, plain findings, the table per metric (best_of_K's selection caveat beside
its number), the plots, and a few image rows per (guidance, steps). One HTML file: the plots are the PNG files
beside it and the images are embedded as thumbnails (golden_noise.report), so the sweep folder can be copied."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..io import atomic_write_text
from ..report import _CSS, SELF_CONTAINED_NOTE, _rel, diff_class, figure_html
from .plots import pareto, series_label
from .table import NOTES

NO_SHARE = "—"  # a share of an oracle gain whose CI contains 0


def _f(x, digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return ""
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _where(r: dict) -> str:
    n = f", n={r['num_gen_steps']}" if r["num_gen_steps"] is not None else ""
    return f"w={r['guidance_scale']:g}, {r['num_inference_steps']} steps{n}"


def _scales(rows: Sequence[dict]) -> str:
    return ", ".join(f"{r['guidance_scale']:g}" for r in sorted(rows, key=lambda r: r["guidance_scale"]))


def by_steps(rows: Sequence[dict]) -> list[str]:
    """Cells grouped per step count, in a few words each: ['4 steps: w = 1, 1.5, 2', '20 steps: w = 1']."""
    steps = sorted({r["num_inference_steps"] for r in rows})
    return [f"{s} steps: w = {_scales([r for r in rows if r['num_inference_steps'] == s])}" for s in steps]


@dataclass
class MethodFindings:
    """Where one series (a method, with its rollout length n) gains, loses and beats the tuned guidance."""

    series: str
    gains: list[str]
    losses: list[str]
    beats_tuned: list[str]
    note: str = ""


@dataclass
class Findings:
    """The plain findings of one metric: per series, gnsnet's share of the oracle's gain, the cost frontier."""

    metric: str
    series: list[MethodFindings]
    oracle_shares: list[str]   # '20 steps, n=2: w=1 92%, w=1.5 100%' where the oracle's gain CI excludes 0
    no_oracle_gain: list[str]  # cells where the oracle's gain CI contains 0 (no share to speak of)
    frontier: list[dict]       # the rows on the cost frontier, cheapest first

    def text(self) -> str:
        """The findings as indented plain text (what scripts/sweep.py prints)."""
        def items(cells: list[str]) -> str:
            return "; ".join(cells) or "no cell"

        out = [f"findings ({self.metric}):"]
        for s in self.series:
            out += [f"  {s.series}" + (f" ({s.note})" if s.note else ""),
                    f"    gain over standard, 95% CI above 0: {items(s.gains)}",
                    f"    loss, 95% CI below 0:               {items(s.losses)}",
                    f"    beats the tuned guidance:           {items(s.beats_tuned)}"]
        if self.oracle_shares:
            out.append("  gnsnet's share of the oracle's gain, where the oracle's gain CI excludes 0:")
            out += [f"    {share}" for share in self.oracle_shares]
        if self.no_oracle_gain:
            out.append(f"  no share ({NO_SHARE}) where the oracle's own gain CI contains 0: "
                       f"{items(self.no_oracle_gain)}")
        out.append("  on the cost frontier (no cheaper or equal cell scores higher), cheapest first:")
        out += [f"    {r['unet_evals_per_image']:.1f} UNet evals: {r['method']} {_where(r)}, mean {r['mean']:.4f}"
                for r in self.frontier]
        return "\n".join(out)


def findings(rows: Sequence[dict]) -> list[Findings]:
    """Per metric: where each series' gain CI excludes 0, where it beats the tuned guidance, what share of the
    oracle's gain gnsnet keeps (only where the oracle's gain CI excludes 0), and the cells on the cost frontier."""
    out = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        rs = [r for r in rows if r["metric"] == metric]
        series: dict[str, list[dict]] = {}
        for r in rs:
            if r["method"] != "standard":
                series.setdefault(series_label(r), []).append(r)
        found = []
        for label, mine in series.items():
            note = mine[0]["selection_bias"] if mine[0]["method"].startswith("best_of") else ""
            found.append(MethodFindings(
                label, by_steps([r for r in mine if r["ci_low"] > 0]), by_steps([r for r in mine if r["ci_high"] < 0]),
                by_steps([r for r in mine if r["ci_low_vs_tuned"] is not None and r["ci_low_vs_tuned"] > 0]), note))
        oracle = {(r["guidance_scale"], r["num_inference_steps"], r["num_gen_steps"]): r for r in rs
                  if r["method"] == "oracle"}
        key = lambda r: (r["guidance_scale"], r["num_inference_steps"], r["num_gen_steps"])  # noqa: E731
        gnsnet = sorted((r for r in rs if r["method"] == "gnsnet" and key(r) in oracle),
                        key=lambda r: (r["num_inference_steps"], r["num_gen_steps"], r["guidance_scale"]))
        groups: dict[tuple, list[dict]] = {}
        for r in gnsnet:
            if r["share_of_oracle_gain"] is not None:
                groups.setdefault((r["num_inference_steps"], r["num_gen_steps"]), []).append(r)
        share = lambda r: f"w={r['guidance_scale']:g} {100 * r['share_of_oracle_gain']:.0f}%"  # noqa: E731
        shares = [f"{steps} steps, n={n}: " + ", ".join(map(share, cells)) for (steps, n), cells in groups.items()]
        none = [_where(r) for r in gnsnet if r["share_of_oracle_gain"] is None]
        front = set(pareto([(r["unet_evals_per_image"], r["mean"]) for r in rs]))
        frontier = sorted((r for r in rs if (r["unet_evals_per_image"], r["mean"]) in front),
                          key=lambda r: (r["unet_evals_per_image"], -r["mean"]))
        out.append(Findings(metric, found, shares, none, frontier))
    return out


def _findings_html(f: Findings) -> list[str]:
    esc = html.escape
    lines = lambda items: "<br>".join(map(esc, items)) or "<span class='note'>no cell</span>"  # noqa: E731
    out = [f"<h3>{esc(f.metric)}</h3><table><tr><th>method</th><th>gain over standard (95% CI above 0)</th>"
           "<th>loss (95% CI below 0)</th><th>beats the best standard guidance of the grid (95% CI above 0)</th>"
           "</tr>"]
    for s in f.series:
        note = f"<br><span class='note'>{esc(s.note)}</span>" if s.note else ""
        out.append(f"<tr><td>{esc(s.series)}{note}</td><td>{lines(s.gains)}</td><td>{lines(s.losses)}</td>"
                   f"<td>{lines(s.beats_tuned)}</td></tr>")
    out.append("</table><ul>")
    if f.oracle_shares:
        out.append("<li>gnsnet's share of the oracle's gain, where the oracle's gain CI excludes 0:<ul>"
                   + "".join(f"<li>{esc(s)}</li>" for s in f.oracle_shares) + "</ul></li>")
    if f.no_oracle_gain:
        out.append(f"<li>no share is given ({NO_SHARE}) where the oracle's own gain CI contains 0: "
                   f"{esc('; '.join(f.no_oracle_gain))}.</li>")
    out.append("<li>on the cost frontier (no cheaper or equal cell scores higher), cheapest first:<ul>"
               + "".join(f"<li>{r['unet_evals_per_image']:.1f} UNet evaluations per image: {esc(r['method'])} "
                         f"{esc(_where(r))}, mean {r['mean']:.4f}</li>" for r in f.frontier) + "</ul></li></ul>")
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


def _with_ci(value: str, low: str, high: str) -> str:
    return f"{value}<span class='ci'>[{low}, {high}]</span>"


def _table(rows: Sequence[dict]) -> list[str]:
    esc = html.escape
    head = ["steps", "w", "method", "n", "mean [95% CI]", "diff vs standard [95% CI]", "win rate",
            "vs tuned guidance [95% CI]", "oracle share", "UNet evals / image", "s / image", "note"]
    out = ["<table class='summary'><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        diff = "(baseline)" if r["diff"] is None else \
            _with_ci(_f(r["diff"], signed=True), _f(r["ci_low"], signed=True), _f(r["ci_high"], signed=True))
        tuned = esc(f"(tuned: w={r['tuned_guidance_scale']:g})") if r["diff_vs_tuned"] is None else \
            _with_ci(f"{_f(r['diff_vs_tuned'], signed=True)} vs w={r['tuned_guidance_scale']:g}",
                     _f(r["ci_low_vs_tuned"], signed=True), _f(r["ci_high_vs_tuned"], signed=True))
        share = "" if r["diff_vs_oracle"] is None and r["share_of_oracle_gain"] is None else \
            NO_SHARE if r["share_of_oracle_gain"] is None else f"{100 * r['share_of_oracle_gain']:.0f}%"
        cls = diff_class(r["diff"]) if r["diff"] is not None and (r["ci_low"] > 0 or r["ci_high"] < 0) else "num"
        cells = [(str(r["num_inference_steps"]), "num"), (f"{r['guidance_scale']:g}", "num"), (esc(r["method"]), ""),
                 ("" if r["num_gen_steps"] is None else str(r["num_gen_steps"]), "num"),
                 (_with_ci(_f(r["mean"]), _f(r["mean_ci_low"]), _f(r["mean_ci_high"])), "num"), (diff, cls),
                 ("" if r["win_rate"] is None else f"{100 * r['win_rate']:.1f}%", "num"), (tuned, "num"),
                 (share, "num"), (f"{r['unet_evals_per_image']:.2f}", "num"), (f"{r['seconds_per_image']:.4f}", "num"),
                 (esc(r["selection_bias"] or ""), "note")]
        out.append("<tr>" + "".join(f"<td class='{k}'>{c}</td>" for c, k in cells) + "</tr>")
    out.append("</table>")
    return out


def _image_rows(block: ImageRows, root: Path, metric: str) -> list[str]:
    esc = html.escape
    out = [f"<h3>w = {block.guidance_scale:g}, {block.num_inference_steps} steps</h3><table class='images'><tr>"
           "<th class='index'>index</th>"]
    out += [f"<th>{esc(c)}</th>" for c in block.columns]
    out.append("</tr>")
    for i in block.indices:
        out.append(f"<tr><td class='num'>{i}</td>")
        out += [f"<td>{figure_html(block.files[c][i], root, f'{c} {i}', f'{esc(metric)} {block.scores[c][i]:.4f}')}"
                "</td>" for c in block.columns]
        out.append("</tr>")
    out.append("</table>")
    return out


def write_report(path: Path, rows: Sequence[dict], plots: Sequence[Path], images: Sequence[ImageRows],
                 prompts: dict[int, str], title: str, subtitle: str) -> None:
    """Write report.html (findings, a table per metric, plots, image rows with their prompts)."""
    esc, root = html.escape, path.parent
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_CSS}td.note{{max-width:260px;white-space:normal}}.summary td{{white-space:normal}}</style>"
           f"</head><body><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p><h2>Findings</h2>"]
    for found in findings(rows):
        out += _findings_html(found)
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    for metric in metrics:
        out.append(f"<h2>{esc(metric)}</h2>")
        out += _table([r for r in rows if r["metric"] == metric])
    out.append(f"<p class='note'>{esc(NOTES)}</p><h2>Plots</h2><div class='plots'>")
    out += [f"<a href='{_rel(p, root)}'><img src='{_rel(p, root)}' alt='{esc(p.name)}'></a>" for p in plots]
    out.append("</div><p class='note'>reward_vs_guidance: mean reward per method against the sampling guidance "
               "scale (bands: 95% CIs), and below it the gain over standard at the same guidance (with one guidance "
               "scale, reward_vs_steps: the same against the sampling step count, with 95% CI bars); reward_vs_cost: "
               "every cell at its counted cost, the dashed line is the frontier (the best reward any cell reaches "
               "at or below that cost); gain_vs_rollout: the gain over standard against the rollout length n.</p>")
    if images:
        out.append(f"<h2>Images</h2><p class='note'>Same prompt and seed across a row; best_of_K shows the "
                   f"candidate it kept; captions: {esc(metrics[0])}. {esc(SELF_CONTAINED_NOTE)} Prompts: " + "; ".join(
                       f"{i}: {esc(prompts[i])}" for i in images[0].indices) + "</p>")
        for block in images:
            out += _image_rows(block, root, metrics[0])
    out.append("</body></html>\n")
    atomic_write_text(path, "\n".join(out))
