"""The sweep's plots (matplotlib, Agg), one set per metric: reward vs guidance scale per method with 95% CI bands
(and the gain vs standard below it; with a single guidance scale, reward vs the sampling step count instead),
reward vs cost with the frontier, and the gain vs the rollout length n."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..methods import order_key
from ..report import pyplot, save_figure

COLORS = {"standard": "#4c72b0", "gnsnet": "#55a868", "oracle": "#c44e52"}
BEST_OF_COLORS = ("#8172b2", "#937860", "#da8bc3", "#8c8c8c")


def series_label(row: dict) -> str:
    return row["method"] + (f" n={row['num_gen_steps']}" if row["num_gen_steps"] is not None else "")


def _color(method: str, k: int = 0) -> str:
    return COLORS.get(method, BEST_OF_COLORS[k % len(BEST_OF_COLORS)])


def _series(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by method and n, in display order, each sorted by guidance scale."""
    out: dict[str, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (order_key(r["method"]), r["num_gen_steps"] or 0, r["guidance_scale"])):
        out.setdefault(series_label(r), []).append(r)
    return out


def _styles(series: dict[str, list[dict]]) -> dict[str, dict]:
    """A colour per method (lighter dashes for larger n) and a marker per series."""
    styles, best = {}, 0
    for i, (label, rows) in enumerate(series.items()):
        method, n = rows[0]["method"], rows[0]["num_gen_steps"]
        color = _color(method, best)
        best += method.startswith("best_of")
        styles[label] = {"color": color, "marker": "os^vDP*X"[i % 8],
                         "linestyle": "-" if not n else ["-", "--", ":", "-."][(n - 1) % 4]}
    return styles


def plot_guidance(rows: Sequence[dict], metric: str, path: Path) -> Path:
    """Per step count (columns): mean reward vs guidance scale with CI bands (top), gain vs standard (bottom)."""
    plt = pyplot()
    steps = sorted({r["num_inference_steps"] for r in rows})
    fig, axes = plt.subplots(2, len(steps), figsize=(5.2 * len(steps), 7), squeeze=False, sharex="col")
    for j, s in enumerate(steps):
        series = _series([r for r in rows if r["num_inference_steps"] == s])
        styles = _styles(series)
        top, bottom = axes[0][j], axes[1][j]
        for label, rs in series.items():
            x = [r["guidance_scale"] for r in rs]
            st = styles[label]
            top.plot(x, [r["mean"] for r in rs], label=label, **st)
            top.fill_between(x, [r["mean_ci_low"] for r in rs], [r["mean_ci_high"] for r in rs], color=st["color"],
                             alpha=0.12)
            if rs[0]["diff"] is not None:
                bottom.plot(x, [r["diff"] for r in rs], label=label, **st)
                bottom.fill_between(x, [r["ci_low"] for r in rs], [r["ci_high"] for r in rs], color=st["color"],
                                    alpha=0.12)
        bottom.axhline(0, color="gray", lw=1, ls="--")
        top.set_title(f"{s} sampling steps", fontsize=10)
        top.set_ylabel(f"mean {metric} (95% CI)")
        bottom.set_ylabel(f"{metric}: method - standard (95% CI)")
        bottom.set_xlabel("sampling guidance scale")
        top.legend(fontsize=7)
    fig.suptitle(f"{metric} vs guidance scale", fontsize=11)
    return save_figure(fig, path)


def plot_steps(rows: Sequence[dict], metric: str, path: Path) -> Path:
    """A grid with one guidance scale (e.g. a few-step student at w = 1): mean reward (top) and gain vs standard
    (bottom) per series against the sampling step count, with 95% CI bars; the steps are evenly spaced categories
    and the series side by side within each, so no point or label hides another."""
    plt = pyplot()
    steps = sorted({r["num_inference_steps"] for r in rows})
    series = _series(sorted(rows, key=lambda r: r["num_inference_steps"]))
    styles = _styles(series)
    width = 0.8 / max(1, len(series))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 1.4 * len(steps) * max(1, len(series)) ** 0.5), 7),
                                      sharex=True)
    for k, (label, rs) in enumerate(series.items()):
        st = {key: v for key, v in styles[label].items() if key != "linestyle"}
        x = [steps.index(r["num_inference_steps"]) - 0.4 + width * (k + 0.5) for r in rs]
        means = [r["mean"] for r in rs]
        top.errorbar(x, means, yerr=[[m - r["mean_ci_low"] for m, r in zip(means, rs)],
                                     [r["mean_ci_high"] - m for m, r in zip(means, rs)]],
                     ls="none", capsize=3, label=label, **st)
        if rs[0]["diff"] is not None:
            diffs = [r["diff"] for r in rs]
            bottom.errorbar(x, diffs, yerr=[[d - r["ci_low"] for d, r in zip(diffs, rs)],
                                            [r["ci_high"] - d for d, r in zip(diffs, rs)]],
                            ls="none", capsize=3, label=label, **st)
    bottom.axhline(0, color="gray", lw=1, ls="--")
    bottom.set_xticks(range(len(steps)), [str(s) for s in steps])
    bottom.set_xlim(-0.6, len(steps) - 0.4)
    bottom.set_xlabel("sampling steps")
    top.set_ylabel(f"mean {metric} (95% CI)")
    bottom.set_ylabel(f"{metric}: method - standard (95% CI)")
    top.legend(fontsize=7, ncol=2, loc="best")
    fig.suptitle(f"{metric} vs sampling steps at guidance scale {rows[0]['guidance_scale']:g}", fontsize=11)
    return save_figure(fig, path)


def pareto(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The frontier: points no cheaper-or-equal point beats, by increasing cost."""
    front, best = [], float("-inf")
    for cost, value in sorted(points, key=lambda p: (p[0], -p[1])):
        if value > best:
            front.append((cost, value))
            best = value
    return front


def plot_cost(rows: Sequence[dict], metric: str, path: Path) -> Path:
    """Mean reward vs UNet evaluations per image for every cell, and the frontier (the best reward for a cost)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    steps = sorted({r["num_inference_steps"] for r in rows})
    markers = dict(zip(steps, "os^vDP*X"))
    methods = sorted({r["method"] for r in rows}, key=order_key)
    for i, method in enumerate(methods):
        for s in steps:
            rs = [r for r in rows if r["method"] == method and r["num_inference_steps"] == s]
            if rs:
                ax.scatter([r["unet_evals_per_image"] for r in rs], [r["mean"] for r in rs], s=28,
                           color=_color(method, i), marker=markers[s], label=f"{method}, {s} steps", alpha=0.85)
    front = pareto([(r["unet_evals_per_image"], r["mean"]) for r in rows])
    ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=1, ls="--",
            label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("UNet evaluations per image (counted; log scale)")
    ax.set_ylabel(f"mean {metric}")
    ax.set_title(f"{metric} vs cost: each point a (method, guidance, steps, n) cell", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_rollout(rows: Sequence[dict], metric: str, path: Path) -> Path | None:
    """Gain vs standard (95% CI error bars) against the rollout length n, per method and guidance scale."""
    golden = [r for r in rows if r["num_gen_steps"] is not None]
    if not golden:
        return None
    plt = pyplot()
    steps = sorted({r["num_inference_steps"] for r in golden})
    fig, axes = plt.subplots(1, len(steps), figsize=(5.2 * len(steps), 4), squeeze=False)
    for j, s in enumerate(steps):
        ax = axes[0][j]
        for method in ("gnsnet", "oracle"):
            scales = sorted({r["guidance_scale"] for r in golden if r["method"] == method})
            for k, w in enumerate(scales):
                rs = sorted((r for r in golden if (r["method"], r["num_inference_steps"], r["guidance_scale"])
                             == (method, s, w)), key=lambda r: r["num_gen_steps"])
                if not rs:
                    continue
                x = [r["num_gen_steps"] + (0.06 if method == "oracle" else 0) for r in rs]
                y = [r["diff"] for r in rs]
                err = [[d - r["ci_low"] for d, r in zip(y, rs)], [r["ci_high"] - d for d, r in zip(y, rs)]]
                ax.errorbar(x, y, yerr=err, color=_color(method), alpha=0.35 + 0.65 * (k + 1) / len(scales),
                            marker="o" if method == "gnsnet" else "^", capsize=3,
                            ls="-" if method == "gnsnet" else "--", label=f"{method} w={w:g}")
        ax.axhline(0, color="gray", lw=1, ls="--")
        ax.set_xlabel("rollout length n (golden steps)")
        ax.set_ylabel(f"{metric}: method - standard (95% CI)")
        ax.set_title(f"{s} sampling steps", fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def write_plots(rows: Sequence[dict], out: Path) -> list[Path]:
    """Every plot, per metric: reward_vs_guidance_{m}.png (reward_vs_steps_{m}.png when the grid has one guidance
    scale), reward_vs_cost_{m}.png, gain_vs_rollout_{m}.png."""
    paths = []
    for metric in dict.fromkeys(r["metric"] for r in rows):
        rs = [r for r in rows if r["metric"] == metric]
        if len({r["guidance_scale"] for r in rs}) > 1:
            paths.append(plot_guidance(rs, metric, out / f"reward_vs_guidance_{metric}.png"))
        else:
            paths.append(plot_steps(rs, metric, out / f"reward_vs_steps_{metric}.png"))
        paths.append(plot_cost(rs, metric, out / f"reward_vs_cost_{metric}.png"))
        rollout = plot_rollout(rs, metric, out / f"gain_vs_rollout_{metric}.png")
        if rollout is not None:
            paths.append(rollout)
    return paths
