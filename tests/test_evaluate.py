"""Stage 6: paired statistics with known answers, and the evaluation CLI on images from the tiny SDXL pipeline
(HPSv2 and CLIPScore on tiny offline models, user rewards from a Python file, the manifest check, the report)."""
from __future__ import annotations

import base64
import csv
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from golden_noise.errors import UserError
from golden_noise.rewards.base import metric_names
from golden_noise.stats import bootstrap_ci, describe, paired_comparison, ttest_p, wilcoxon_p, win_rate
from golden_noise.testing.rewards import save_tiny_clip, save_tiny_hps
from tests.conftest import ROOT, run_cli

SCRIPT = "scripts/evaluate_hps.py"
METHODS = ("standard", "gnsnet", "oracle")
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




# The quickstart's printed tables (/tmp/qs_baseline.log of the reference run), rebuilt from the numbers behind them:
# the one text-table formatter must print them to the last character.
QS_RESULTS = {"toy_attributes": {
    "standard": {"n": 240, "mean": 0.94572, "std": 0.08993},
    "gnsnet": {"n": 240, "mean": 0.97831, "std": 0.05071, "diff_mean": 0.03259, "ci95_low": 0.02221,
               "ci95_high": 0.04389, "win_rate": 0.725, "wilcoxon_p": 4.68e-15, "ttest_p": 1.6e-08},
    "oracle": {"n": 240, "mean": 0.98121, "std": 0.04522, "diff_mean": 0.03549, "ci95_low": 0.02491,
               "ci95_high": 0.04671, "win_rate": 0.77083, "wilcoxon_p": 2.43e-18, "ttest_p": 1.56e-09}}}
QS_EVALUATION_TABLE = """\
metric          method    n    mean ± std       diff vs standard [95% CI]   win rate  wilcoxon p  t-test p
--------------  --------  ---  ---------------  --------------------------  --------  ----------  --------
toy_attributes  standard  240  0.9457 ± 0.0899  (baseline)
toy_attributes  gnsnet    240  0.9783 ± 0.0507  +0.0326 [+0.0222, +0.0439]  72.5%     4.68e-15    1.60e-08
toy_attributes  oracle    240  0.9812 ± 0.0452  +0.0355 [+0.0249, +0.0467]  77.1%     2.43e-18    1.56e-09"""
QS_SUMMARY_TABLE = """\
method    mean toy_attributes  gain vs standard [95% CI]   win rate  share of oracle gain  noise cost / sampling
--------  -------------------  --------------------------  --------  --------------------  ---------------------
standard  0.9457               (baseline)                                                  0
gnsnet    0.9783               +0.0326 [+0.0222, +0.0439]  72.5%     92%                   0.069
oracle    0.9812               +0.0355 [+0.0249, +0.0467]  77.1%     100%                  0.324
validation: the RNN explains 89.4% of the golden change at step n=2 on 2640 held-out sequences (rollout vs x_T \
unchanged)"""


def test_quickstart_tables_keep_their_text(tmp_path):
    from golden_noise.report import format_table
    from golden_noise_toy.quickstart import summary_table

    assert format_table(QS_RESULTS, "standard") == QS_EVALUATION_TABLE
    for folder, name, data in [
        ("results", "summary.json", {"results": QS_RESULTS}),
        ("images", "run.json", {"methods": {"standard": {"noise_over_sampling": 0.0},
                                                "gnsnet": {"noise_over_sampling": 0.0692},
                                                "oracle": {"noise_over_sampling": 0.3241}}}),
        ("run", "validation.json", {"validation": {"final_step": {"explained_fraction": 0.8941, "step": 2},
                                                   "num_samples": 2640}})]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / name).write_text(json.dumps(data), encoding="utf-8")
    table, facts = summary_table(tmp_path / "results", tmp_path / "run", tmp_path / "images")
    assert table == QS_SUMMARY_TABLE
    assert list(facts["methods"]) == list(METHODS) and facts["methods"]["gnsnet"]["noise_over_sampling"] == 0.0692
    # an oracle whose gain CI contains 0: no share of it is shown (not -2781% or 827%)
    flat = json.loads(json.dumps(QS_RESULTS))
    flat["toy_attributes"]["oracle"].update(diff_mean=-0.00002, ci95_low=-0.0012, ci95_high=0.0011)
    (tmp_path / "results" / "summary.json").write_text(json.dumps({"results": flat}), encoding="utf-8")
    table, _ = summary_table(tmp_path / "results", tmp_path / "run", tmp_path / "images")
    rows = {line.split()[0]: line for line in table.splitlines()[2:5]}
    assert "%" not in rows["gnsnet"].split("72.5%")[1] and " — " in rows["gnsnet"] and " — " in rows["oracle"]


def test_report_html_does_not_colour_differences_that_show_as_zero(tmp_path):
    """A difference that rounds to ±0.0000 at the shown precision is neither a win nor a loss."""
    from golden_noise.report import diff_class, write_html

    base = np.array([0.5, 0.5, 0.5, 0.5, 0.5])
    diffs = np.array([1e-6, -1e-6, 0.01, -0.01, 0.0])
    scores = {"m": {"standard": base, "gnsnet": base + diffs}}
    files = {m: {i: tmp_path / f"{m}_{i}.png" for i in range(5)} for m in ("standard", "gnsnet")}
    for by_index in files.values():
        for f in by_index.values():
            Image.new("RGB", (8, 8), "gray").save(f)
    results = {"m": {"standard": describe(base), "gnsnet": {**describe(base + diffs),
                                                            **paired_comparison(base + diffs, base, samples=50)}}}
    path = tmp_path / "report.html"
    write_html(path, indices=list(range(5)), prompts={i: f"p{i}" for i in range(5)}, files=files, scores=scores,
               results=results, baseline="standard", plots=[], missing={}, title="t", subtitle="s")

    class DiffCells(HTMLParser):
        """(class, value) of the last cell of each per-prompt row: the difference."""

        def __init__(self):
            super().__init__()
            self.rows, self.inside = [], False

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            self.inside = self.inside or (tag == "table" and a.get("id") == "prompts")
            if self.inside and tag == "tr":
                self.rows.append([])
            if self.inside and tag == "td" and self.rows:
                self.rows[-1].append((a.get("class", "").split(), float(a.get("data-v", "nan"))))

    parser = DiffCells()
    parser.feed(path.read_text(encoding="utf-8"))
    cells = [row[-1] for row in parser.rows if row]
    assert [v for _, v in cells] == pytest.approx(list(diffs), abs=1e-12)
    assert [cls for cls, _ in cells] == [["num"], ["num"], ["num", "pos"], ["num", "neg"], ["num"]]
    assert (diff_class(0.00004999), diff_class(0.00005001), diff_class(-0.00005001)) == ("num", "num pos", "num neg")


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
        if tag == "th" and "sort" in a.get("class", "").split():
            self.sortable += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_prompts = False


PLUGIN = '''"""Rewards for the tests, written the way a user writes one."""
import json
import math
from pathlib import Path

import numpy as np

THRESHOLD = 3


class Brightness:
    """Mean brightness in [0, 1]; records the options it was built with."""

    def __init__(self, path=None, batch_size=8):
        Path(__file__).with_name("brightness_options.json").write_text(json.dumps({"path": path,
                                                                                   "batch_size": batch_size}))

    def score(self, images, prompts):
        return [float(np.asarray(im.convert("RGB"), dtype=np.float64).mean() / 255) for im in images]


def hpsv2(**options):
    """A factory named like a built-in reward: the prompt's length, the same for every method."""
    class Length:
        def score(self, images, prompts):
            return [len(p) for p in prompts]
    return Length()


class Short:
    def score(self, images, prompts):
        return [0.5] * (len(images) - 1)


class NotFinite:
    def score(self, images, prompts):
        return [0.5] * (len(images) - 1) + [math.nan]


class Broken:
    def score(self, images, prompts):
        return 1 / 0


class NoScore:
    pass
'''


def _write_manifest(base: Path, prompts: dict[int, str]) -> None:
    """manifest.csv as batch inference writes it, for every image under `base`."""
    rows = ["index,prompt,seed,method,file,seconds,noise_seconds,sampling_seconds"]
    for method in METHODS:
        for png in sorted((base / f"{method}_output").glob("*.png"), key=lambda p: int(p.stem)):
            i = int(png.stem)
            text = prompts[i].replace('"', '""')
            rows.append(f'{i},"{text}",{1000 + i},{method},{method}_output/{i}.png,0.1,0.0,0.1')
    (base / "manifest.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_pipeline):
    """Prompt file, tiny scorer models, a user reward file, and `{method}_output/{index}.png` images from the tiny
    SDXL pipeline with batch inference's manifest.csv."""
    import torch

    from golden_noise.diffusion import latent_shape, sample_images, seeded_noise

    root = tmp_path_factory.mktemp("evaluate")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    checkpoint, config = save_tiny_hps(root / "hps", seed=0)
    save_tiny_clip(root / "clip", seed=0)
    (root / "plug.py").write_text(PLUGIN, encoding="utf-8")
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
    _write_manifest(base, dict(enumerate(PROMPTS)))
    return {"root": root, "base": base, "prompts": root / "prompts.txt", "checkpoint": checkpoint,
            "config": config, "clip": root / "clip", "plugin": root / "plug.py"}


def _hps_args(ws, results, *extra):
    return ["--prompt_file", ws["prompts"], "--image_base_dir", ws["base"], "--results_dir", results,
            "--hps_checkpoint", ws["checkpoint"], "--hps_model", ws["config"], "--device", "cpu",
            "--bootstrap_samples", "500", *extra]


def _plugin_args(ws, results, *names, base=None):
    """Flags that score with the rewards `names` (default: Brightness) of the workspace's user reward file."""
    return ["--prompt_file", ws["prompts"], "--image_base_dir", base or ws["base"], "--results_dir", results,
            "--device", "cpu", "--bootstrap_samples", "200", "--no_progress",
            "--metrics", *(f"{ws['plugin']}:{name}" for name in names or ["Brightness"])]


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_hps", ROOT / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_inprocess(*args):
    cli = _script()
    return cli.main(cli.parse_args([str(a) for a in args]))


def test_evaluate_cli_writes_csv_summary_plots_and_html(workspace, tmp_path):
    """End to end through the seed's spelling scripts/evalute.sh -> evaluate.sh -> evaluate_hps.py, with a fresh
    matplotlib cache (its font-cache notices must not reach the log) and the scoring progress bar."""
    ws, results = workspace, tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MPLCONFIGDIR": str(tmp_path / "mpl"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PROMPT_FILE": str(ws["prompts"]), "IMAGE_BASE_DIR": str(ws["base"]), "RESULTS_DIR": str(results)}
    args = _hps_args(ws, results, "--batch_size", "3")[6:]  # the rest come from the environment
    proc = subprocess.run(["bash", "scripts/evalute.sh", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "diff vs standard [95% CI]" in proc.stdout and "images/s" in proc.stdout
    assert f"Open {results}/report.html" in proc.stdout  # evaluate.sh's closing line
    assert "oracle lacks 1 of 5 images (indices 5)" in proc.stderr
    assert "manifest" not in proc.stderr  # every image is listed with its prompt: nothing to warn about
    assert [line for line in proc.stderr.splitlines() if "font" in line.lower()] == []
    assert (tmp_path / "mpl").is_dir()  # matplotlib did build its cache there, quietly
    bars = [part for part in proc.stderr.replace("\r", "\n").splitlines() if part.startswith("scoring hpsv2:")]
    assert bars and "12/12" in bars[-1] and len(bars) <= 4, bars  # a bar, refreshed rarely in a log

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
    g, d = summary["results"]["hpsv2"]["gnsnet"], gns - std
    assert g["mean"] == pytest.approx(gns.mean()) and g["diff_mean"] == pytest.approx(d.mean())
    assert (g["ci95_low"], g["ci95_high"]) == pytest.approx(bootstrap_ci(d, samples=500, seed=0))
    assert g["win_rate"] == ((d > 0).sum() + 0.5 * (d == 0).sum()) / 4
    assert g["wilcoxon_p"] == pytest.approx(sps.wilcoxon(d).pvalue)
    assert "diff_mean" not in summary["results"]["hpsv2"]["standard"]
    assert summary["throughput"]["hpsv2"]["images"] == 12 and summary["settings"]["batch_size"] == 3

    plots = [results / p for p in summary["files"]["plots"]]
    assert sorted(p.name for p in plots) == ["hpsv2_diff_hist_gnsnet.png", "hpsv2_diff_hist_oracle.png",
                                             "hpsv2_scatter_gnsnet.png", "hpsv2_scatter_oracle.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots)

    parser = _Links()
    parser.feed((results / "report.html").read_text(encoding="utf-8"))
    linked = {(results / unquote(s)).resolve() for s in parser.hrefs}
    images = {(ws["base"] / f"{m}_output" / f"{i}.png").resolve() for m in METHODS for i in (0, 1, 3, 4)}
    assert linked == images | {p.resolve() for p in plots} and all(p.is_file() for p in linked)
    # the images are embedded (their own PNG bytes: they are small), so a copy of the results folder alone shows
    # every image; the plots are the files beside the report
    embedded = [s for s in parser.srcs if s.startswith("data:image/png;base64,")]
    assert sorted(base64.b64decode(s.split(",", 1)[1]) for s in embedded) == sorted(p.read_bytes() for p in images)
    assert {(results / unquote(s)).resolve() for s in parser.srcs if not s.startswith("data:")} == \
        {p.resolve() for p in plots}
    assert parser.rows == 1 + 4 and parser.sortable == 1 + 3 + 2  # index, 3 methods, 2 differences
    assert not list(results.glob(".*.tmp"))


def test_several_metrics_and_chosen_methods(workspace, tmp_path):
    ws, results = workspace, tmp_path / "results"
    summary = _run_inprocess(*_hps_args(ws, results), "--metrics", "hpsv2", "clipscore", "--methods", "gnsnet",
                             "standard", "--reward_path", f"clipscore={ws['clip']}", "--no_progress")
    assert summary["methods"] == ["standard", "gnsnet"] and summary["n_evaluated"] == 5
    with open(results / "hpsv2_clipscore_evaluation.csv", encoding="utf-8") as f:
        header = next(csv.reader(f))
    assert header == ["index", "prompt", "hpsv2_standard", "hpsv2_gnsnet", "hpsv2_diff_gnsnet",
                      "clipscore_standard", "clipscore_gnsnet", "clipscore_diff_gnsnet"]
    assert set(summary["results"]) == {"hpsv2", "clipscore"} and len(summary["files"]["plots"]) == 4
    assert summary["settings"]["reward_paths"]["clipscore"] == str(ws["clip"])


def test_list_flags_take_spaces_or_commas():
    cli = _script()
    spaced = cli.parse_args(["--prompt_file", "p", "--metrics", "hpsv2", "pickscore", "--methods", "standard",
                             "gnsnet_output"])
    commas = cli.parse_args(["--prompt_file", "p", "--metrics", "hpsv2,pickscore", "--methods",
                             "standard,gnsnet_output"])
    assert spaced.metrics == commas.metrics == ["hpsv2", "pickscore"]
    assert spaced.methods == commas.methods == ["standard", "gnsnet_output"]
    assert cli.parse_args(["--prompt_file", "p"]).metrics == ["hpsv2"]
    assert cli.parse_args(["--prompt_file", "p", "--metrics", "dir/my_rewards.py:Score"]).metrics == \
        ["dir/my_rewards.py:Score"]


def test_help_lists_the_registries_and_imports_no_scorer(tmp_path):
    """--help takes its choices from the registries without importing open_clip, matplotlib or the toy world."""
    code = (
        "import contextlib, io, json, runpy, sys\n"
        "sys.argv = ['evaluate_hps.py', '--help']\n"
        "buf = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(buf):\n"
        f"        runpy.run_path({str(ROOT / SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'open_clip', 'matplotlib', 'golden_noise_toy'})\n"
        "print(json.dumps({'code': code, 'help': buf.getvalue(), 'heavy': heavy}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    out = json.loads(proc.stdout)
    assert out["code"] == 0 and out["heavy"] == []
    text = " ".join(out["help"].split())
    assert "aesthetic, clipscore, hpsv2, pickscore, toy_attributes or FILE.py:NAME" in text
    assert "standard, gnsnet, direct, npnet, oracle or best_of_K" in text and "(default: hpsv2)" in text
    assert "(default: None)" not in text and "(default: [])" not in text
    for flag_help in text.split(" --")[1:]:
        assert flag_help.count("(default") <= 1, flag_help


def test_user_reward_from_a_python_file(workspace, tmp_path):
    """--metrics FILE.py:NAME end to end: built with the options it accepts, scored, named NAME in every output
    (or stem_NAME when NAME is also a built-in), its numbers those of the user's code."""
    ws, results = workspace, tmp_path / "results"
    plugin = ws["plugin"]
    summary = _run_inprocess(*_plugin_args(ws, results, "Brightness", "hpsv2"), "--batch_size", "2",
                             "--reward_path", f"Brightness={tmp_path / 'weights.pt'}")
    assert summary["metrics"] == ["Brightness", "plug_hpsv2"]
    options = json.loads((plugin.parent / "brightness_options.json").read_text())
    assert options == {"path": str(tmp_path / "weights.pt"), "batch_size": 2}
    with open(results / "Brightness_plug_hpsv2_evaluation.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for m in METHODS:
        expected = [np.asarray(Image.open(ws["base"] / f"{m}_output" / f"{r['index']}.png").convert("RGB"),
                               dtype=np.float64).mean() / 255 for r in rows]
        assert np.allclose([float(r[f"Brightness_{m}"]) for r in rows], expected, rtol=0, atol=1e-12)
        assert [float(r[f"plug_hpsv2_{m}"]) for r in rows] == [len(r["prompt"]) for r in rows]
    length = summary["results"]["plug_hpsv2"]["gnsnet"]
    assert (length["win_rate"], length["ties"], length["diff_mean"]) == (0.5, 4, 0.0)  # all ties: half a win each
    assert summary["settings"]["rewards"]["Brightness"] == f"{plugin}:Brightness"
    assert (results / "Brightness_scatter_gnsnet.png").is_file()


def test_user_reward_errors_are_one_line_and_write_nothing(workspace, tmp_path, capsys):
    from golden_noise.runtime import run_cli as run_main

    ws = workspace
    for name, message in [
        ("Nope", r"plug\.py defines no Nope \(its classes and functions: Brightness, Broken, NoScore, NotFinite, "
                 r"Short, hpsv2\)"),
        ("THRESHOLD", r"THRESHOLD in .*plug\.py is a int, not a class or factory"),
        ("NoScore", r"NoScore\(\.\.\.\) returned a NoScore without a score\(images, prompts\) method"),
        ("Short", r"returned 3 values for 4 images: return one float per image"),
        ("NotFinite", r"returned nan for image 3 of the batch \(1 non-finite of 4\): return finite floats"),
        ("Broken", r"score raised at line \d+ \(ZeroDivisionError: division by zero\)"),
    ]:
        results = tmp_path / name
        with pytest.raises(UserError, match=message):
            _run_inprocess(*_plugin_args(ws, results, name))
        # found before any image is read (no results folder), or while scoring (nothing written)
        assert (not results.exists()) if name in ("Nope", "THRESHOLD") else list(results.iterdir()) == []
    with pytest.raises(UserError, match=r"reward file .*missing\.py does not exist"):
        _run_inprocess(*_plugin_args(ws, tmp_path / "r")[:-1], f"{tmp_path}/missing.py:X")
    bad = tmp_path / "bad.py"
    bad.write_text("def f(:\n", encoding="utf-8")
    cli = _script()
    capsys.readouterr()
    code = run_main(cli.main, cli.parse_args, [str(a) for a in _plugin_args(ws, tmp_path / "r")[:-1]] + [f"{bad}:f"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("error: --metrics") and "failed at line 1" in err


def test_metric_names_are_unambiguous():
    assert metric_names(["hpsv2", "a/r.py:Score", "b/q.py:Other"]) == ["hpsv2", "Score", "Other"]
    assert metric_names(["a/r.py:Score", "b/q.py:Score"]) == ["r_Score", "q_Score"]
    assert metric_names(["a/my-rewards v2.py:pickscore"]) == ["my-rewards_v2_pickscore"]


def _copy(ws, tmp_path) -> Path:
    base = tmp_path / "images"
    shutil.copytree(ws["base"], base)
    return base


def test_prompts_must_match_the_manifest(workspace, tmp_path):
    """Images made for other prompts are refused (first differing index, both prompts named); without a
    manifest the evaluation warns once and pairs by index."""
    ws = workspace
    base = _copy(ws, tmp_path)
    others = tmp_path / "others.txt"  # the audit's case: as many prompts, other texts
    others.write_text("\n".join(p and f"{p}, at night" for p in PROMPTS) + "\n", encoding="utf-8")
    args = _plugin_args(ws, tmp_path / "r", base=base)
    args[1] = others
    with pytest.raises(UserError, match=r"made from other prompts than .*others\.txt: first at index 0, "
                                        r"manifest\.csv has 'a red cube' \(0\.png of standard_output\) but the "
                                        r"prompt file has 'a red cube, at night'"):
        _run_inprocess(*args)
    assert not (tmp_path / "r").exists()

    edited = {**dict(enumerate(PROMPTS)), 3: "café with a dog", 4: "two dogs in the rain"}
    _write_manifest(base, edited)
    with pytest.raises(UserError, match=r"first at index 3, manifest\.csv has 'café with a dog' .* prompt file "
                                        r"has 'café with a cat'"):
        _run_inprocess(*_plugin_args(ws, tmp_path / "r", base=base))

    (base / "manifest.csv").write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"manifest\.csv is not a batch-inference manifest"):
        _run_inprocess(*_plugin_args(ws, tmp_path / "r", base=base))

    (base / "manifest.csv").unlink()
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("golden_noise.evaluation")
    logger.addHandler(handler)
    try:
        summary = _run_inprocess(*_plugin_args(ws, tmp_path / "r", base=base))
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if "manifest" in r.getMessage()]
    assert len(warnings) == 1 and "no manifest.csv in" in warnings[0] and "pairing them by index" in warnings[0]
    assert summary["n_evaluated"] == 4


def test_unwritable_results_dir_fails_before_any_model_loads(workspace, tmp_path, monkeypatch, capsys):
    import golden_noise.evaluation as evaluation
    from golden_noise.runtime import run_cli as run_main

    def no_model(*args, **kwargs):
        raise AssertionError("a reward model was loaded before --results_dir was checked")

    monkeypatch.setattr(evaluation, "load_reward", no_model)
    regular = tmp_path / "file.txt"
    regular.write_text("x", encoding="utf-8")
    cli = _script()
    for results in ("/proc/x", regular / "sub"):
        code = run_main(cli.main, cli.parse_args, [str(a) for a in _hps_args(workspace, results)])
        err = capsys.readouterr().err.strip().splitlines()  # log lines, then the error in one line
        assert code == 2 and "Traceback" not in err and [e for e in err if e.startswith("error")] == err[-1:]
        assert err[-1].startswith(f"error: --results_dir {results} is not a writable folder"), err
    assert regular.read_text(encoding="utf-8") == "x"


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
    assert not (tmp_path / "r").exists()  # refused before the results folder is made

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


def test_bad_flags_are_one_line_errors(workspace, tmp_path, capsys):
    ws = workspace
    for extra, message in [
        (["--reward_path", "pickscore"], "write METRIC=PATH"),
        (["--metrics", "hpsv2", "hpsv2"], "names a metric twice"),
        (["--reward_path", f"clipscore={ws['clip']}"], "not in --metrics"),
        (["--baseline", "ghost"], "baseline method 'ghost'"),
    ]:
        with pytest.raises(UserError, match=message):
            _run_inprocess(*_hps_args(ws, tmp_path / "r"), *extra)
    for extra, message in [(["--metrics", "hpsv2,nope"], "--metrics: invalid choice 'nope'"),
                           (["--methods", "standard", "ghost"], "--methods: invalid choice 'ghost'"),
                           (["--bootstrap_samples", "0"], "--bootstrap_samples must be at least 1, got 0")]:
        with pytest.raises(SystemExit) as exit_info:
            _script().parse_args([str(a) for a in _hps_args(ws, tmp_path / "r", *extra)])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--methods best_of_4: neither .*best_of_4_output nor .*best_of_4 is a"):
        _run_inprocess(*_hps_args(ws, tmp_path / "r"), "--methods", "standard", "best_of_4")
    with pytest.raises(UserError, match="no \\*_output folders"):
        _run_inprocess(*[a if a != ws["base"] else tmp_path for a in _hps_args(ws, tmp_path / "r")])
    proc = run_cli(SCRIPT, *_hps_args(ws, tmp_path / "r"), "--image_base_dir", tmp_path / "absent")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --image_base_dir")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
