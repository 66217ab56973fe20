"""Stage 6 outputs: the per-prompt scores CSV, the summary table, plots and a self-contained HTML report."""
from __future__ import annotations

import csv
import html
import io
import logging
import math
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import numpy as np

from .io import atomic_path, atomic_write_text
from .tables import format_table as text_table

NOTES = ("diff = method - baseline per prompt; CI = 95% percentile bootstrap of the mean diff (prompts resampled, "
         "seeded); win rate = share of prompts where the method scores higher, ties counted as half; p-values are "
         "two-sided: Wilcoxon signed-rank (zero diffs dropped) and paired t-test. hpsv2 is the raw cosine "
         "(papers print it x100).")


def csv_name(metrics: Sequence[str]) -> str:
    """'hpsv2_evaluation.csv' for the default metric; '{m1}_{m2}_evaluation.csv' for several."""
    return "_".join(metrics) + "_evaluation.csv"


def score_columns(metrics: Sequence[str], methods: Sequence[str], baseline: str) -> list[str]:
    """`{metric}_{method}` for every method, then `{metric}_diff_{method}` (method - baseline) per metric."""
    cols = []
    for metric in metrics:
        cols += [f"{metric}_{m}" for m in methods]
        cols += [f"{metric}_diff_{m}" for m in methods if m != baseline]
    return cols


def write_scores_csv(path: str | os.PathLike, indices: Sequence[int], prompts: dict[int, str],
                     scores: dict[str, dict[str, np.ndarray]], baseline: str) -> None:
    """One row per evaluated prompt: index, prompt, the score columns (full float precision)."""
    metrics = list(scores)
    methods = list(scores[metrics[0]])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "prompt"] + score_columns(metrics, methods, baseline))
    for row, index in enumerate(indices):
        values = []
        for metric in metrics:
            values += [repr(float(scores[metric][m][row])) for m in methods]
            values += [repr(float(scores[metric][m][row] - scores[metric][baseline][row]))
                       for m in methods if m != baseline]
        writer.writerow([index, prompts[index]] + values)
    atomic_write_text(path, buf.getvalue())


def _num(x, fmt: str = "{:.4f}", signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return (fmt.replace("{:", "{:+") if signed else fmt).format(x)


def _p(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.2e}" if x < 1e-3 else f"{x:.4f}"


def table_rows(results: dict, baseline: str) -> list[list[str]]:
    """The summary as rows of strings: header first."""
    rows = [["metric", "method", "n", "mean ± std", f"diff vs {baseline} [95% CI]", "win rate", "wilcoxon p",
             "t-test p"]]
    for metric, by_method in results.items():
        for method, r in by_method.items():
            paired = "diff_mean" in r
            rows.append([metric, method, str(r["n"]), f"{_num(r['mean'])} ± {_num(r['std'])}",
                         f"{_num(r['diff_mean'], signed=True)} [{_num(r['ci95_low'], signed=True)}, "
                         f"{_num(r['ci95_high'], signed=True)}]" if paired else "(baseline)",
                         f"{100 * r['win_rate']:.1f}%" if paired else "",
                         _p(r["wilcoxon_p"]) if paired else "", _p(r["ttest_p"]) if paired else ""])
    return rows


def format_table(results: dict, baseline: str) -> str:
    """A plain-text, column-aligned summary table."""
    rows = table_rows(results, baseline)
    return text_table(rows[1:], header=rows[0])


def pyplot():
    """matplotlib.pyplot on the Agg backend, with matplotlib's font-cache and config-dir notices ("generated new
    fontManager", "Matplotlib is building the font cache", "findfont: ...") kept out of the logs: its own loggers
    are set to errors only before it is imported."""
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write `fig` as a PNG (atomically) and close it; returns `path`."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def write_plots(results_dir: str | os.PathLike, scores: dict[str, dict[str, np.ndarray]],
                baseline: str) -> list[Path]:
    """Per metric and non-baseline method: a paired scatter (`{metric}_scatter_{method}.png`) and a
    histogram of the differences (`{metric}_diff_hist_{method}.png`)."""
    plt = pyplot()
    out, results_dir = [], Path(results_dir)
    for metric, by_method in scores.items():
        base = by_method[baseline]
        for method, values in by_method.items():
            if method == baseline:
                continue
            diff = values - base
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter(base, values, s=12, alpha=0.7, c=np.sign(diff), cmap="coolwarm_r", vmin=-1, vmax=1)
            low, high = float(min(base.min(), values.min())), float(max(base.max(), values.max()))
            pad = 0.05 * (high - low or 1.0)
            ax.plot([low - pad, high + pad], [low - pad, high + pad], color="gray", lw=1, ls="--")
            ax.set_xlim(low - pad, high + pad)
            ax.set_ylim(low - pad, high + pad)
            ax.set_xlabel(f"{metric}: {baseline}")
            ax.set_ylabel(f"{metric}: {method}")
            ax.set_title(f"{metric} per prompt ({(diff > 0).sum()} above the line, {(diff < 0).sum()} below)",
                         fontsize=9)
            out.append(save_figure(fig, results_dir / f"{metric}_scatter_{method}.png"))

            fig, ax = plt.subplots(figsize=(5.5, 3.5))
            ax.hist(diff, bins=max(5, min(50, int(np.sqrt(diff.size)) * 2)), color="#4c72b0", alpha=0.85)
            ax.axvline(0, color="gray", lw=1, ls="--")
            ax.axvline(float(diff.mean()), color="#c44e52", lw=1.5, label=f"mean {diff.mean():+.4f}")
            ax.set_xlabel(f"{metric}: {method} - {baseline}")
            ax.set_ylabel("prompts")
            ax.legend(fontsize=8)
            out.append(save_figure(fig, results_dir / f"{metric}_diff_hist_{method}.png"))
    return out


def _rel(path: Path, start: Path) -> str:
    """A URL-quoted relative link from the report's folder to `path`."""
    rel = os.path.relpath(Path(path).resolve(), Path(start).resolve())
    return quote(rel.replace(os.sep, "/"))


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:20px}h2{font-size:16px;margin-top:24px}h3{font-size:14px;margin:16px 0 6px}
table{border-collapse:collapse;max-width:100%}td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;
font-size:13px}
th{background:#f3f3f3;position:sticky;top:0}th.sort{cursor:pointer;user-select:none}th.sort:hover{background:#e4e4ff}
th.asc:after{content:" \\25B2"}th.desc:after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.prompt{overflow-wrap:anywhere}
.pos{color:#157a2c;font-weight:600}.neg{color:#b3261e;font-weight:600}
.ci{display:block;font-size:11px;color:#555;font-weight:normal;white-space:nowrap}
table.images{table-layout:fixed;width:100%}table.images th{overflow-wrap:break-word}
th.index{width:3.5em}th.prompt{width:16em}th.diff{width:9em}
figure{margin:0;text-align:center}figure img{display:block;width:100%;max-width:192px;height:auto;
aspect-ratio:1/1;object-fit:contain;background:#eee;margin:0 auto}img.small{image-rendering:pixelated}
figcaption{font-size:12px}
.plots img{width:300px;max-width:100%;margin:4px;border:1px solid #ddd;vertical-align:top}
.summary td{white-space:nowrap}.note{color:#555;font-size:12px;max-width:900px}
"""

THUMBNAIL_PX = 192  # the largest side of an image embedded in a report


def thumbnail_uri(path: str | os.PathLike, size: int = THUMBNAIL_PX) -> tuple[str, bool]:
    """(a data: URI of the image at `path`, whether it is under half of `size`) to embed in a report, so the report
    shows its images wherever it is copied: a PNG that fits in `size` px is embedded as it is, a larger image as a
    JPEG thumbnail of at most `size` px. (Reports draw the small ones, like the toy world's 32 px, with sharp
    pixels.)"""
    import base64

    from PIL import Image

    with Image.open(path) as image:
        largest = max(image.size)
        if largest <= size and image.format == "PNG":
            data, mime = Path(path).read_bytes(), "image/png"
        else:
            thumb = image.convert("RGB")
            thumb.thumbnail((size, size), Image.LANCZOS)
            buf = io.BytesIO()
            thumb.save(buf, format="JPEG", quality=85)
            data, mime = buf.getvalue(), "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", largest < size // 2


def figure_html(path: Path, root: Path, alt: str, caption: str) -> str:
    """An embedded thumbnail of the image at `path` linking to the full image (relative to `root`, the report's
    folder), with an HTML `caption` below it."""
    uri, small = thumbnail_uri(path)
    klass = " class='small'" if small else ""
    return (f"<figure><a href='{_rel(path, root)}'><img src='{uri}' alt='{html.escape(alt)}'{klass}></a>"
            f"<figcaption>{caption}</figcaption></figure>")


SELF_CONTAINED_NOTE = ("Images are embedded as thumbnails (up to 192 px), so this file shows them wherever it is "
                       "copied; a click opens the full image at its place relative to this file, and the plots are "
                       "the PNG files beside it.")


_JS = """
document.querySelectorAll('th.sort').forEach(function (th) {
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0], col = th.cellIndex;
    var asc = !th.classList.contains('asc');
    table.querySelectorAll('th.sort').forEach(function (h) { h.classList.remove('asc', 'desc'); });
    th.classList.add(asc ? 'asc' : 'desc');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = parseFloat(a.cells[col].dataset.v), y = parseFloat(b.cells[col].dataset.v);
      return (x - y) * (asc ? 1 : -1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def diff_class(diff: float, digits: int = 4) -> str:
    """The CSS class of a difference cell: 'num pos' / 'num neg' for a win / loss, plain 'num' for a difference
    that shows as ±0.0000 at the printed precision (no win or loss a reader can see)."""
    shown = float(f"{diff:.{digits}f}")
    return "num pos" if shown > 0 else "num neg" if shown < 0 else "num"


def write_html(path: str | os.PathLike, *, indices: Sequence[int], prompts: dict[int, str],
               files: dict[str, dict[int, Path]], scores: dict[str, dict[str, np.ndarray]], results: dict,
               baseline: str, plots: Sequence[Path], missing: dict[str, str], title: str, subtitle: str) -> None:
    """A single HTML file: summary table, plots, and one row per prompt with every method's image and scores,
    sortable by clicking a column header (index, a method's first-metric score, or a difference)."""
    path = Path(path)
    root = path.parent
    metrics, methods = list(scores), list(files)
    esc = html.escape
    out = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>",
           f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p>"]

    out.append("<h2>Summary</h2><table class='summary'>")
    rows = table_rows(results, baseline)
    out.append("<tr>" + "".join(f"<th>{esc(c)}</th>" for c in rows[0]) + "</tr>")
    for r in rows[1:]:
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    out.append(f"</table><p class='note'>{esc(NOTES)}</p>")
    gaps = {m: s for m, s in missing.items() if s}
    if gaps:
        out.append("<p class='note'>Missing images (not evaluated): " + "; ".join(
            f"<b>{esc(m)}</b> lacks {esc(s)}" for m, s in gaps.items()) + "</p>")
    if plots:
        opened = " open" if len(plots) <= 4 else ""
        out.append(f"<details{opened}><summary><b>Plots ({len(plots)})</b>: paired scatter and histogram of the "
                   "differences per metric and method</summary><div class='plots'>" + "".join(
                       f"<a href='{_rel(p, root)}'><img src='{_rel(p, root)}' alt='{esc(p.name)}'></a>"
                       for p in plots) + "</div></details>")

    out.append("<h2>Per prompt</h2><p class='note'>Click a column header to sort (again to reverse); "
               f"differences are method - {esc(baseline)}. {esc(SELF_CONTAINED_NOTE)}</p>"
               "<table id='prompts' class='images'><thead><tr><th class='sort index'>index</th>"
               "<th class='prompt'>prompt</th>")
    out += [f"<th class='sort' title='sort by {esc(metrics[0])}'>{esc(m)}</th>" for m in methods]
    diff_cols = [(metric, m) for metric in metrics for m in methods if m != baseline]
    out += [f"<th class='sort diff'>{esc(metric)} diff {esc(m)}</th>" for metric, m in diff_cols]
    out.append("</tr></thead><tbody>")
    for row, index in enumerate(indices):
        cells = [f"<td class='num' data-v='{index}'>{index}</td>", f"<td class='prompt'>{esc(prompts[index])}</td>"]
        for m in methods:
            caption = "<br>".join(f"{esc(metric)} {scores[metric][m][row]:.4f}" for metric in metrics)
            cells.append(f"<td data-v='{float(scores[metrics[0]][m][row])!r}'>"
                         f"{figure_html(files[m][index], root, f'{m} {index}', caption)}</td>")
        for metric, m in diff_cols:
            d = float(scores[metric][m][row] - scores[metric][baseline][row])
            cells.append(f"<td class='{diff_class(d)}' data-v='{d!r}'>{d:+.4f}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append(f"</tbody></table><script>{_JS}</script></body></html>\n")
    atomic_write_text(path, "\n".join(out))
