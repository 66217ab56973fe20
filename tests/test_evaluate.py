"""Stage 6: paired statistics with known answers, and the evaluation CLI on images from the tiny SDXL pipeline."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from scipy import stats as sps

from golden_noise.errors import UserError
from golden_noise.testing.rewards import save_tiny_clip, save_tiny_hps
from golden_noise.stats import bootstrap_ci, describe, paired_comparison, ttest_p, wilcoxon_p, win_rate
from tests.conftest import ROOT, run_cli

SCRIPT = "scripts/evaluate_hps.py"
# Line 2 is blank (no image, keeps its index); oracle lacks index 5.
PROMPTS = ["a red cube", "a blue sphere on grass", "", "café with a cat", "two dogs in the snow", "a lighthouse"]


# ---------------------------------------------------------------- statistics


def test_win_rate_counts_ties_as_half():
    assert win_rate([1.0, -1.0, 0.0, 2.0]) == pytest.approx(2.5 / 4)
    assert win_rate([0.0, 0.0]) == 0.5
    assert win_rate([0.1] * 7) == 1.0


def test_bootstrap_ci_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(123)
    hits, trials = 0, 300
    for k in range(trials):
        diffs = rng.normal(0.3, 1.0, size=40)
        low, high = bootstrap_ci(diffs, samples=1000, seed=k)
        assert low < diffs.mean() < high
        hits += low <= 0.3 <= high
    assert 0.89 <= hits / trials <= 0.99, hits / trials
    assert bootstrap_ci(diffs, samples=500, seed=7) == bootstrap_ci(diffs, samples=500, seed=7)  # seeded


def test_p_values_and_paired_comparison_known_answers():
    # All ten differences positive: the exact two-sided signed-rank p is 2 / 2**10.
    assert wilcoxon_p(np.arange(1, 11) * 0.01) == pytest.approx(2 / 1024)
    # Paired t on d = 1..5: t = 3 / (sqrt(2.5) / sqrt(5)), df = 4.
    t = 3 / (np.sqrt(2.5) / np.sqrt(5))
    assert ttest_p([1, 2, 3, 4, 5]) == pytest.approx(2 * sps.t.sf(t, 4), rel=1e-9)
    # Symmetric differences: no evidence either way.
    assert wilcoxon_p([-2, -1, 1, 2]) == pytest.approx(1.0)
    assert ttest_p([-2, -1, 1, 2]) == pytest.approx(1.0)
    assert wilcoxon_p([0, 0, 0]) == 1.0
    base = np.arange(20) * 0.25  # exact in binary, so every difference is exactly 0.5
    r = paired_comparison(base + 0.5, base, samples=200)
    assert r["diff_mean"] == 0.5 and r["ci95_low"] == 0.5 and r["ci95_high"] == 0.5
    assert (r["win_rate"], r["wins"], r["ties"], r["losses"]) == (1.0, 20, 0, 0)
    assert r["wilcoxon_p"] < 1e-3 and r["ttest_p"] == 0.0
    d = describe([1.0, 2.0, 3.0])
    assert d == {"n": 3, "mean": 2.0, "std": 1.0}


# ---------------------------------------------------------------- the CLI


class _Links(HTMLParser):
    """Collects img src / a href targets and counts rows of the per-prompt table."""

    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.rows, self._in_prompts, self.sortable = [], [], 0, False, 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag == "table" and a.get("id") == "prompts":
            self._in_prompts = True
        if tag == "tr" and self._in_prompts:
            self.rows += 1
        if tag == "th" and a.get("class") == "sort":
            self.sortable += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_prompts = False


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipeline):
    """Prompt file, tiny scorer models, and `{method}_output/{index}.png` images from the tiny SDXL pipeline."""
    import torch

    from golden_noise.diffusion import latent_shape, sample_images, seeded_noise

    root = tmp_path_factory.mktemp("evaluate")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    checkpoint, config = save_tiny_hps(root / "hps", seed=0)
    save_tiny_clip(root / "clip", seed=0)
    indices = [i for i, p in enumerate(PROMPTS) if p]
    noise = seeded_noise([1000 + i for i in indices], latent_shape(tiny_pipeline))
    shift = seeded_noise([7 + i for i in indices], latent_shape(tiny_pipeline))
    latents = {"standard": noise, "gnsnet": noise + 0.3 * shift, "oracle": noise - 0.3 * shift}
    base = root / "inference_output"
    for method, z in latents.items():
        with torch.no_grad():
            images = sample_images(tiny_pipeline, [PROMPTS[i] for i in indices], z, num_inference_steps=2)
        out = base / f"{method}_output"
        out.mkdir(parents=True)
        for i, im in zip(indices, images):
            if not (method == "oracle" and i == 5):
                im.save(out / f"{i}.png")
    (base / "manifest.csv").write_text("index,prompt,seed,method,file,seconds\n", encoding="utf-8")
    return {"root": root, "base": base, "prompts": root / "prompts.txt", "checkpoint": checkpoint,
            "config": config, "clip": root / "clip"}


def _hps_args(ws, results, *extra):
    return ["--prompt_file", ws["prompts"], "--image_base_dir", ws["base"], "--results_dir", results,
            "--hps_checkpoint", ws["checkpoint"], "--hps_model", ws["config"], "--device", "cpu",
            "--bootstrap_samples", "500", *extra]


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_hps", ROOT / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_inprocess(*args):
    cli = _script()
    return cli.main(cli.parse_args([str(a) for a in args]))


def test_evaluate_cli_writes_csv_summary_plots_and_html(workspace, tmp_path):
    ws, results = workspace, tmp_path / "results"
    proc = run_cli(SCRIPT, *_hps_args(ws, results), "--batch_size", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diff vs standard [95% CI]" in proc.stdout and "images/s" in proc.stdout
    assert "oracle lacks 1 of 5 images (indices 5)" in proc.stderr

    with open(results / "hpsv2_evaluation.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["index"]) for r in rows] == [0, 1, 3, 4]
    assert [r["prompt"] for r in rows] == [PROMPTS[i] for i in (0, 1, 3, 4)]
    assert list(rows[0])[2:] == ["hpsv2_standard", "hpsv2_gnsnet", "hpsv2_oracle", "hpsv2_diff_gnsnet",
                                 "hpsv2_diff_oracle"]
    std, gns = (np.array([float(r[f"hpsv2_{m}"]) for r in rows]) for m in ("standard", "gnsnet"))
    assert np.allclose([float(r["hpsv2_diff_gnsnet"]) for r in rows], gns - std)
    assert np.ptp(std) > 0 and not np.allclose(std, gns)

    summary = json.loads((results / "summary.json").read_text())
    assert summary["methods"] == ["standard", "gnsnet", "oracle"] and summary["baseline"] == "standard"
    assert summary["n_prompts"] == 5 and summary["n_evaluated"] == 4
    assert summary["missing"] == {"standard": [], "gnsnet": [], "oracle": [5]}
    g = summary["results"]["hpsv2"]["gnsnet"]
    assert g["mean"] == pytest.approx(gns.mean()) and g["diff_mean"] == pytest.approx((gns - std).mean())
    assert g["ci95_low"] <= g["diff_mean"] <= g["ci95_high"] and 0 <= g["win_rate"] <= 1
    assert 0 < g["wilcoxon_p"] <= 1 and "diff_mean" not in summary["results"]["hpsv2"]["standard"]
    assert summary["throughput"]["hpsv2"]["images"] == 12

    plots = [results / p for p in summary["files"]["plots"]]
    assert sorted(p.name for p in plots) == ["hpsv2_diff_hist_gnsnet.png", "hpsv2_diff_hist_oracle.png",
                                             "hpsv2_scatter_gnsnet.png", "hpsv2_scatter_oracle.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    parser = _Links()
    parser.feed((results / "report.html").read_text(encoding="utf-8"))
    referenced = {(results / unquote(s)).resolve() for s in parser.srcs}
    expected = {(ws["base"] / f"{m}_output" / f"{i}.png").resolve() for m in ("standard", "gnsnet", "oracle")
                for i in (0, 1, 3, 4)} | {p.resolve() for p in plots}
    assert expected == referenced
    assert all(p.is_file() for p in referenced) and set(parser.srcs) <= set(parser.hrefs)
    assert parser.rows == 1 + 4 and parser.sortable == 1 + 3 + 2  # index, 3 methods, 2 differences
    assert not list(results.glob(".*.tmp"))


def test_several_metrics_and_chosen_methods(workspace, tmp_path):
    ws, results = workspace, tmp_path / "results"
    summary = _run_inprocess(*_hps_args(ws, results), "--metrics", "hpsv2,clipscore", "--methods", "gnsnet,standard",
                             "--reward_path", f"clipscore={ws['clip']}")
    assert summary["methods"] == ["standard", "gnsnet"] and summary["n_evaluated"] == 5
    with open(results / "hpsv2_clipscore_evaluation.csv", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["index", "prompt", "hpsv2_standard", "hpsv2_gnsnet", "hpsv2_diff_gnsnet",
                      "clipscore_standard", "clipscore_gnsnet", "clipscore_diff_gnsnet"]
    assert set(summary["results"]) == {"hpsv2", "clipscore"} and len(summary["files"]["plots"]) == 4


def _copy(ws, tmp_path) -> Path:
    base = tmp_path / "images"
    shutil.copytree(ws["base"], base)
    return base


def test_bad_images_and_mismatched_prompts_name_the_file(workspace, tmp_path):
    ws = workspace
    base = _copy(ws, tmp_path)
    args = lambda: [a if a != ws["base"] else base for a in _hps_args(ws, tmp_path / "r")]  # noqa: E731

    (base / "gnsnet_output" / "1.png").write_bytes(b"this is not a png")
    with pytest.raises(UserError, match=r"cannot read image .*gnsnet_output/1\.png"):
        _run_inprocess(*args())
    data = (base / "standard_output" / "0.png").read_bytes()
    (base / "gnsnet_output" / "1.png").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(UserError, match=r"gnsnet_output/1\.png"):
        _run_inprocess(*args())
    (base / "gnsnet_output" / "1.png").write_bytes(data)

    shutil.copy(base / "standard_output" / "0.png", base / "standard_output" / "9.png")
    with pytest.raises(UserError, match=r"standard_output/9\.png is for prompt index 9, but .*prompts\.txt has "
                                        r"prompts only up to index 5"):
        _run_inprocess(*args())
    (base / "standard_output" / "9.png").rename(base / "standard_output" / "2.png")
    with pytest.raises(UserError, match=r"2\.png is for prompt index 2, but line 3 of .*prompts\.txt is blank"):
        _run_inprocess(*args())
    (base / "standard_output" / "2.png").unlink()

    for png in (base / "oracle_output").glob("*.png"):
        png.unlink()
    (base / "oracle_output" / "5.png").write_bytes(data)
    (base / "standard_output" / "5.png").unlink()
    with pytest.raises(UserError, match="no prompt has an image in every method folder"):
        _run_inprocess(*args())


def test_bad_flags_are_one_line_errors(workspace, tmp_path):
    ws = workspace
    for extra, message in [
        (["--reward_path", "pickscore"], "write METRIC=PATH"),
        (["--metrics", "hpsv2,nope"], "choose distinct metrics"),
        (["--reward_path", f"clipscore={ws['clip']}"], "not in --metrics"),
        (["--methods", "standard,ghost"], "ghost"),
        (["--baseline", "ghost"], "baseline method 'ghost'"),
    ]:
        with pytest.raises(UserError, match=message):
            _run_inprocess(*_hps_args(ws, tmp_path / "r"), *extra)
    with pytest.raises(UserError, match="no \\*_output folders"):
        _run_inprocess(*[a if a != ws["base"] else tmp_path for a in _hps_args(ws, tmp_path / "r")])
    proc = run_cli(SCRIPT, *_hps_args(ws, tmp_path / "r"), "--image_base_dir", tmp_path / "absent")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --image_base_dir")
    assert not (tmp_path / "r").exists()
