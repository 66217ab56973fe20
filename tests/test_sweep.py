"""scripts/sweep.py on the tiny offline SDXL pipeline with a tiny RNN export and user rewards from a temporary file:
the tiny sweep end to end (2 guidance scales x standard, gnsnet, oracle, best_of_2), its statistics recomputed from
the images, best_of_K's seeds, the cost columns against UNet rows counted by a forward hook, resume (complete cells
skipped; a killed run resumed gives the same sweep.csv), growing a sweep, refused reruns and bad flags."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_noise.errors import UserError
from golden_noise.stats import paired_comparison
from tests.conftest import load_cli
from tests.test_generate import run_main
from tests.test_inference import make_export

SCRIPT = "scripts/sweep.py"
PROMPTS = ["a red apple on a table", "a blue car", "", "a cat wearing a hat", "synthwave city at sunset"]
INDICES = [0, 1, 3, 4]  # line 2 is blank
START_SEED, STEPS, SCALES, NS = 100, 2, (1.0, 3.0), (1, 2)
REWARDS = '''
import numpy as np


class Brightness:
    def __init__(self, path=None, batch_size=8):
        pass

    def score(self, images, prompts):
        return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]


class Redness:
    def score(self, images, prompts):
        return [float(np.asarray(im.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255) for im in images]
'''
REQUIRED = ("guidance_scale", "num_inference_steps", "num_gen_steps", "method", "metric", "n", "mean", "diff",
            "ci_low", "ci_high", "win_rate", "unet_evals_per_image", "seconds_per_image", "diff_vs_tuned",
            "ci_low_vs_tuned", "ci_high_vs_tuned", "win_rate_vs_tuned", "tuned_guidance_scale", "selection_bias")


def brightness(path) -> float:
    return float(np.asarray(Image.open(path).convert("L"), dtype=np.float64).mean() / 255)


def redness(path) -> float:
    return float(np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)[..., 0].mean() / 255)


@pytest.fixture(scope="module")
def setup(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sweep")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    make_export(root / "run" / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir)
    (root / "rewards.py").write_text(REWARDS, encoding="utf-8")
    return {"root": root, "prompt_file": prompt_file, "export": root / "run", "rewards": root / "rewards.py"}


def sweep_args(setup: dict, out: Path, *extra, scales=SCALES, methods=("standard", "gnsnet", "oracle", "best_of_2"),
               batch_size=2, metrics=None) -> list:
    metrics = metrics or [f"{setup['rewards']}:Brightness", f"{setup['rewards']}:Redness"]
    return ["--prompt_file", setup["prompt_file"], "--output_dir", out, "--rnn_weights_path", setup["export"],
            "--guidance_scales", *scales, "--num_inference_steps", STEPS, "--num_gen_steps", *NS,
            "--methods", *methods, "--metrics", *metrics, "--start_seed", START_SEED, "--batch_size", batch_size,
            "--device", "cpu", "--no_progress", "--bootstrap_samples", 500, *extra]


class UNetRows:
    """A global forward hook: rows of every real (non-meta) UNet2DConditionModel forward, whoever calls it."""

    def __enter__(self):
        from diffusers import UNet2DConditionModel

        self.rows = 0

        def hook(module, args, output):
            if isinstance(module, UNet2DConditionModel) and args and args[0].device.type != "meta":
                self.rows += args[0].shape[0]

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def sweep(capsys, *args) -> tuple[int, str, str]:
    return run_main(capsys, SCRIPT, *map(str, args))


def read_csv(path: Path, drop=()) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def tree(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> dict:
    """One uninterrupted sweep, with the UNet rows it ran counted by an independent forward hook."""
    out = tmp_path_factory.mktemp("ref") / "sweep"
    cli = load_cli(SCRIPT)
    with UNetRows() as counted:
        result = cli.main(cli.parse_args([str(a) for a in sweep_args(setup, out)]))
    return {"out": out, "rows": counted.rows, "result": result, "csv": read_csv(out / "sweep.csv")}


def row(rows, method, w, metric="Brightness", n=None):
    found = [r for r in rows if (r["method"], float(r["guidance_scale"]), r["metric"], r["num_gen_steps"])
             == (method, w, metric, "" if n is None else str(n))]
    assert len(found) == 1, (method, w, metric, n)
    return found[0]


def folder(out: Path, method: str, w: float, n=None, k=0) -> Path:
    base = out / "cells" / f"w{w!r}_s{STEPS}"
    if n is not None:
        return Path(f"{base}_n{n}") / f"{method}_output"
    return (base / f"k{k}" if k else base) / "standard_output"


def test_tiny_sweep_end_to_end(reference, setup):
    out, rows = reference["out"], reference["csv"]
    assert set(REQUIRED) <= set(rows[0])
    cells = [("standard", None), ("gnsnet", 1), ("gnsnet", 2), ("oracle", 1), ("oracle", 2), ("best_of_2", None)]
    assert [(r["method"], r["num_gen_steps"] or None, float(r["guidance_scale"]), r["metric"]) for r in rows] == [
        (m, None if n is None else str(n), w, metric) for w in SCALES for m, n in cells
        for metric in ("Brightness", "Redness")]
    assert all(r["n"] == str(len(INDICES)) for r in rows)
    # every number is recomputed here from the images themselves
    for metric, score in (("Brightness", brightness), ("Redness", redness)):
        for w in SCALES:
            standard = [score(folder(out, "standard", w) / f"{i}.png") for i in INDICES]
            base = row(rows, "standard", w, metric)
            assert float(base["mean"]) == pytest.approx(np.mean(standard), abs=1e-12) and base["diff"] == ""
            for method, n in cells[1:5]:
                values = [score(folder(out, method, w, n) / f"{i}.png") for i in INDICES]
                r = row(rows, method, w, metric, n)
                expected = paired_comparison(values, standard, samples=500, seed=0)
                assert float(r["mean"]) == pytest.approx(np.mean(values), abs=1e-12)
                assert float(r["diff"]) == pytest.approx(expected["diff_mean"], abs=1e-12)
                assert (float(r["ci_low"]), float(r["ci_high"])) == pytest.approx(
                    (expected["ci95_low"], expected["ci95_high"]), abs=1e-12)
                assert float(r["win_rate"]) == expected["win_rate"]
    # best_of_2: per prompt the candidate Brightness (the selection metric) scores higher; evaluated by both metrics
    for w in SCALES:
        k0 = [folder(out, "standard", w) / f"{i}.png" for i in INDICES]
        k1 = [folder(out, "standard", w, k=1) / f"{i}.png" for i in INDICES]
        picked = [b if brightness(b) > brightness(a) else a for a, b in zip(k0, k1)]
        for metric, score in (("Brightness", brightness), ("Redness", redness)):
            r = row(rows, "best_of_2", w, metric)
            assert float(r["mean"]) == pytest.approx(np.mean([score(p) for p in picked]), abs=1e-12)
        assert row(rows, "best_of_2", w)["selection_bias"].startswith("optimistic: the 2 candidates were selected "
                                                                       "by Brightness")
        assert row(rows, "best_of_2", w, "Redness")["selection_bias"] == ("held-out reward: selected by Brightness, "
                                                                          "evaluated by Redness")
        assert row(rows, "best_of_2", w)["selection_metric"] == "Brightness" and row(rows, "gnsnet", w, n=1)[
            "selection_bias"] == ""
    # vs tuned guidance: standard at the grid's best standard guidance (per metric), paired by prompt and seed
    for metric, score in (("Brightness", brightness), ("Redness", redness)):
        means = {w: np.mean([score(folder(out, "standard", w) / f"{i}.png") for i in INDICES]) for w in SCALES}
        tuned = max(SCALES, key=lambda w: means[w])
        tuned_scores = [score(folder(out, "standard", tuned) / f"{i}.png") for i in INDICES]
        for r in (x for x in rows if x["metric"] == metric):
            assert float(r["tuned_guidance_scale"]) == tuned
            if r["method"] == "standard" and float(r["guidance_scale"]) == tuned:
                assert r["diff_vs_tuned"] == ""
            else:
                values = [score(folder(out, "standard", float(r["guidance_scale"])) / f"{i}.png")
                          for i in INDICES] if r["method"] == "standard" else None
                if values is not None:
                    assert float(r["diff_vs_tuned"]) == pytest.approx(np.mean(values) - np.mean(tuned_scores),
                                                                      abs=1e-12)
    # the outputs: plots per metric and a report that says best_of_K's caveat beside its number
    for metric in ("Brightness", "Redness"):
        for plot in ("reward_vs_guidance", "reward_vs_cost", "gain_vs_rollout"):
            assert (out / f"{plot}_{metric}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "optimistic: the 2 candidates were selected by Brightness" in html and "Findings" in html
    assert html.count("<img") >= 2 * len(cells) * min(4, len(INDICES))
    assert "best_of_2" in reference["result"]["table"]


def test_best_of_k_candidates_use_the_seed_rule(reference, tiny_pipeline):
    """Candidate k of prompt i is the standard image of seed start_seed + i + k * 1,000,000 (k = 0: the standard
    image itself, not made twice)."""
    from golden_noise.sweep.grid import SEED_STRIDE

    out = reference["out"]
    assert not (out / "cells" / f"w1.0_s{STEPS}" / "k0").exists()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in ([0, 1], [3, 4]):
            for k in (0, 1):
                gens = [torch.Generator().manual_seed(START_SEED + i + k * SEED_STRIDE) for i in batch]
                images = tiny_pipeline([PROMPTS[i] for i in batch], generator=gens, num_inference_steps=STEPS,
                                       guidance_scale=3.0).images
                for i, image in zip(batch, images):
                    made = np.asarray(Image.open(folder(out, "standard", 3.0, k=k) / f"{i}.png").convert("RGB"))
                    assert np.array_equal(made, np.asarray(image.convert("RGB"))), (k, i)
    finally:
        torch.set_num_threads(threads)


def test_cost_column_equals_unet_rows_counted_by_a_forward_hook(reference, setup, tiny_pipeline):
    rows, p = reference["csv"], len(INDICES)
    evals = lambda m, w, n=None: float(row(rows, m, w, n=n)["unet_rows_per_image"])  # noqa: E731
    # the hook saw every row the sweep ran; each unit's images were made once (best_of_2's k = 0 is standard's)
    expected = sum(p * (evals("standard", w) + (evals("best_of_2", w) - evals("standard", w))
                        + sum(evals("gnsnet", w, n) + evals("oracle", w, n) for n in NS)) for w in SCALES)
    assert reference["rows"] == expected
    for w in SCALES:
        per_step = 1 if w <= 1 else 2  # no CFG at w <= 1
        assert evals("standard", w) == per_step * STEPS
        assert evals("best_of_2", w) == 2 * per_step * STEPS
        for n in NS:
            assert evals("oracle", w, n) == 3 * n + per_step * STEPS  # w_w = 1: 3 rows per golden step
            assert evals("gnsnet", w, n) == per_step * STEPS
            r = row(rows, "gnsnet", w, n=n)
            assert float(r["unet_evals_per_image"]) == evals("gnsnet", w, n) + float(r["rollout_unet_fraction"])
        assert row(rows, "best_of_2", w)["reward_calls_per_image"] == "2"
    # the rollout fraction: the RNN's FLOPs / one UNet forward's, here counted on the real modules (attention in
    # its math form: FlopCounterMode does not count CPU's fused attention kernel)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from golden_noise.diffusion import encode_prompts
    from golden_noise.inference import GoldenNoise

    gn = GoldenNoise.from_pretrained(setup["export"], pipe=tiny_pipeline)
    cond = encode_prompts(tiny_pipeline, [""], with_uncond=False)
    with FlopCounterMode(display=False) as unet, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        tiny_pipeline.unet(torch.zeros(1, 4, 16, 16), 999, **cond.branch("cond"), return_dict=False)
    text = gn.text_embeddings([""])  # (1, P): the text encoders are not the rollout
    for n in NS:
        with FlopCounterMode(display=False) as rnn, torch.no_grad():
            gn.rollout(torch.zeros(1, 4, 16, 16), text, n)
        fraction = rnn.get_total_flops() / unet.get_total_flops()
        assert 0 < fraction
        assert float(row(rows, "gnsnet", 3.0, n=n)["rollout_unet_fraction"]) == pytest.approx(fraction, rel=1e-12)


def test_rerun_skips_complete_cells(reference, setup, tmp_path, capsys):
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(reference["out"], out)
    before = tree(out)
    with UNetRows() as counted:
        code, _, err = sweep(capsys, *sweep_args(setup, out))
    assert code == 0, err
    assert counted.rows == 0 and "12 complete, 0 to make" in err
    after = tree(out)
    changed = sorted(k for k in after if before.get(k) != after[k])
    assert (out / "sweep.csv").read_bytes() == (reference["out"] / "sweep.csv").read_bytes()
    assert all(not k.startswith("cells/") for k in changed), changed  # no image, manifest or score rewritten


def test_killed_sweep_resumes_to_the_same_results(reference, setup, tmp_path, capsys, monkeypatch):
    """Killed while making a unit's images, then while scoring: each rerun of the same command finishes the work
    (complete units are skipped) and the final sweep.csv equals the uninterrupted one's (seconds aside)."""
    import golden_noise.inference.batch as batch
    import golden_noise.sweep.scores as scores

    out = tmp_path / "sweep"

    def die_after(module, name, calls):
        real, seen = getattr(module, name), []

        def dying(*a, **k):
            if len(seen) == calls:
                raise KeyboardInterrupt
            seen.append(1)
            return real(*a, **k)

        monkeypatch.setattr(module, name, dying)

    die_after(batch, "atomic_save_image", 13)  # inside the fourth unit
    code, _, err = sweep(capsys, *sweep_args(setup, out))
    assert code == 130 and not (out / "sweep.csv").exists()
    monkeypatch.undo()
    die_after(scores, "atomic_write_json", 5)  # all images made, scoring half done
    with UNetRows() as resumed:
        code, _, err = sweep(capsys, *sweep_args(setup, out))
    assert code == 130 and "3 complete, 9 to make" in err, err[-3000:]
    assert 0 < resumed.rows < reference["rows"]  # the complete units were not made again
    monkeypatch.undo()
    with UNetRows() as finished:
        code, _, err = sweep(capsys, *sweep_args(setup, out))
    assert code == 0 and finished.rows == 0, err
    drop = ("seconds_per_image",)
    assert read_csv(out / "sweep.csv", drop) == read_csv(reference["out"] / "sweep.csv", drop)
    for name, digest in tree(reference["out"]).items():
        if name.endswith(".png"):
            assert tree(out)[name] == digest, name


def test_growing_a_sweep_reuses_its_cells_and_other_settings_are_refused(reference, setup, tmp_path, capsys):
    import shutil

    out = tmp_path / "sweep"
    shutil.copytree(reference["out"], out)
    with UNetRows() as counted:
        code, _, err = sweep(capsys, *sweep_args(setup, out, scales=(*SCALES, 2.0)))
    assert code == 0, err
    rows = read_csv(out / "sweep.csv")
    new = [r for r in rows if float(r["guidance_scale"]) == 2.0]
    assert len(new) == 12 and "12 complete, 6 to make" in err
    assert counted.rows == len(INDICES) * sum(float(r["unet_rows_per_image"]) for r in new
                                              if r["metric"] == "Brightness" and r["method"] != "best_of_2") + \
        len(INDICES) * float(row(new, "standard", 2.0)["unet_rows_per_image"])  # best_of_2's k = 1
    old = [r for r in rows if float(r["guidance_scale"]) != 2.0]
    assert [(r["method"], r["mean"]) for r in old] == [(r["method"], r["mean"]) for r in reference["csv"]]
    settings = json.loads((out / "sweep_settings.json").read_text())
    assert settings["guidance_scales"] == [1.0, 3.0, 2.0]
    before = tree(out)
    for args, diff in ((sweep_args(setup, out, batch_size=4), "batch_size: 2 -> 4"),
                       (sweep_args(setup, out, "--start_seed", 7), "start_seed: 100 -> 7"),
                       (sweep_args(setup, out, "--negative_prompt", "blurry"), "negative_prompt: None -> 'blurry'")):
        code, _, err = sweep(capsys, *args)
        line = err.strip().splitlines()[-1]
        assert code == 2 and line.startswith("error: ") and diff in line and "choose another --output_dir" in line
    other = tmp_path / "other.py"
    other.write_text(REWARDS, encoding="utf-8")
    code, _, err = sweep(capsys, *sweep_args(setup, out, metrics=[f"{other}:Brightness"]))
    assert code == 2 and "Brightness: {'reward': " in err and "another reward" in err
    assert tree(out) == before


def test_cells_of_another_or_an_edited_export_are_refused(setup, tmp_path, capsys):
    """Issue 20 item 4: the sweep's settings hold the export's identity (weights and config sha256). An edited
    export (delta_scale in its json) fails to load, naming the file; an export of the format before the seal whose
    run_config was edited loads, but the rerun is refused naming rnn_config_sha256, so no cell made with it joins
    (or reuses the scores of) the cells of the original; nothing in the folder changes."""
    import shutil

    from golden_noise.export import config_sha256, file_sha256
    from golden_noise.testing.hub import unseal_export

    for sealed in (True, False):
        run, out = tmp_path / f"run{sealed}", tmp_path / f"sweep{sealed}"
        shutil.copytree(setup["export"], run)
        if not sealed:
            unseal_export(run / "rnn_v3_model_final.safetensors")
        config = run / "rnn_v3_model_final.json"
        args = [*sweep_args({**setup, "export": run}, out, scales=(1.0,), methods=("standard", "gnsnet"),
                            metrics=[f"{setup['rewards']}:Brightness"]), "--max_prompts", 2]
        code, _, err = sweep(capsys, *args)
        assert code == 0, err
        doc = json.loads(config.read_text())
        settings = json.loads((out / "sweep_settings.json").read_text())
        assert settings["rnn_sha256"] == file_sha256(run / "rnn_v3_model_final.safetensors")
        assert settings["rnn_config_sha256"] == config_sha256(doc)
        before = tree(out)
        if sealed:
            doc["model_config"]["delta_scale"] = 0.01
            expected = f"error: {config} does not belong to rnn_v3_model_final.safetensors: edited after export"
        else:
            doc["run_config"]["num_steps"] = 10
            expected = f"error: {out} holds a sweep made with other inputs or settings (rnn_config_sha256: "
        config.write_text(json.dumps(doc))
        code, _, err = sweep(capsys, *args)
        assert code == 2 and err.strip().splitlines()[-1].startswith(expected), err
        assert tree(out) == before


def test_the_model_card_summarises_a_sweep(reference, setup):
    """push_to_hub's card with evaluation=<sweep folder>: every row of sweep.csv in its table, the compared cells
    (diff, CI, win rate) in its metadata."""
    import yaml

    from golden_noise.export import load_export
    from golden_noise.model_card import model_card

    export = load_export(setup["export"])
    card = model_card(export.meta, export.identity, "owner/name", reference["out"])
    head, body = card[4:].split("\n---\n", 1)
    cells = yaml.safe_load(head)["golden_noise"]["evaluation"]["cells"]
    rows = reference["csv"]
    compared = [r for r in rows if r["diff"]]
    assert len(cells) == len(compared) and len(body.split("## Evaluation")[1].splitlines()) >= len(rows)
    for cell, r in zip(cells, compared):
        assert (cell["method"], cell["metric"], cell["diff"], cell["ci95"]) == (
            r["method"], r["metric"], float(r["diff"]), [float(r["ci_low"]), float(r["ci_high"])])
        assert f"{float(r['diff']):+.4f} [{float(r['ci_low']):+.4f}, {float(r['ci_high']):+.4f}]" in body


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_two_processes_make_the_same_sweep(reference, setup, tmp_path):
    """accelerate launch with 2 processes (each takes its share of every unit's batches; the main process scores
    and writes): the same images and the same sweep.csv (seconds aside) as one process."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_training import free_port

    out = tmp_path / "sweep"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(ROOT / SCRIPT), *map(str, sweep_args(setup, out))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "cells" / f"w3.0_s{STEPS}" / "run.json").read_text())["num_processes"] == 2
    for n in NS:  # said once, by the main process (not once per unit and process)
        assert proc.stderr.count(f"--num_gen_steps {n} differs from the 3 steps") == 1, proc.stderr[-3000:]
    drop = ("seconds_per_image",)
    assert read_csv(out / "sweep.csv", drop) == read_csv(reference["out"] / "sweep.csv", drop), proc.stderr[-3000:]
    images = {k: v for k, v in tree(reference["out"]).items() if k.endswith(".png") and k.startswith("cells/")}
    made = {k: v for k, v in tree(out).items() if k in images}
    assert images and made == images, sorted(k for k in images if made.get(k) != images[k])


@pytest.mark.parametrize("args, message", [
    (["--methods", "standard", "best_of_1"], "invalid choice 'best_of_1'"),
    (["--selection_metric", "Nope"], "--selection_metric Nope is not one of --metrics (Brightness, Redness)"),
    (["--guidance_scales", "-1"], "--guidance_scales must not be negative"),
    (["--num_gen_steps", "0"], "--num_gen_steps must be at least 1"),
])
def test_bad_flags_are_one_line_errors(setup, tmp_path, capsys, args, message):
    code, _, err = sweep(capsys, *sweep_args(setup, tmp_path / "out"), *args)
    assert code == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "out" / "sweep_settings.json").exists()


def test_gnsnet_needs_an_rnn_and_unknown_rewards_fail_before_any_model(setup, tmp_path, capsys, monkeypatch):
    import golden_noise.inference.config as config

    monkeypatch.setattr(config, "load_job_pipelines", lambda *a, **k: pytest.fail("a model was loaded"))
    args = [str(a) for a in sweep_args(setup, tmp_path / "out")]
    no_rnn = [a for a in args if a not in ("--rnn_weights_path", str(setup["export"]))]
    code, _, err = sweep(capsys, *no_rnn)
    assert code == 2 and "--methods gnsnet needs --rnn_weights_path" in err
    code, _, err = sweep(capsys, *args, "--metrics", f"{setup['rewards']}:Nope")
    assert code == 2 and "defines no Nope" in err
    with pytest.raises(UserError, match="best_of_K seeds"):
        from golden_noise.sweep.grid import SEED_STRIDE
        from golden_noise.sweep.run import prepare_sweep

        cli = load_cli(SCRIPT)
        job = cli.job_from_args(cli.parse_args(args))
        job.max_prompts = None
        big = tmp_path / "big.txt"
        big.write_text("\n" * SEED_STRIDE + "one prompt too far\n", encoding="utf-8")
        job.prompt_file = str(big)
        prepare_sweep(job, _state())


def _state():
    from golden_noise.runtime import distributed_state

    return distributed_state()


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_bench_sweep_quick_measures_the_unet_and_vae_share(tmp_path):
    """bench/bench_sweep.py --quick runs a real sweep on the toy world and reports the UNet + VAE share of its wall
    time (the quotient of the times it printed) and of its image phase."""
    from tests.test_bench import bench

    res, stdout = bench("bench/bench_sweep.py", tmp_path, "--quick")
    row = res["rows"][0]
    assert row["batch"] == 8 and row["unet_s"] > 0 and row["vae_s"] > 0 and row["text_s"] > 0
    assert row["share"] == pytest.approx((row["unet_s"] + row["vae_s"]) / row["wall_s"])
    assert 0 < row["share"] < row["share_of_image_phase"] <= 1
    assert res["ratios"]["unet_vae_share_of_sweep_wall_time[batch=8]"] == row["share"]
    assert "unet_vae_share_of_sweep_wall_time[batch=8]" in stdout and "targets:" in stdout


def test_sweep_with_a_separate_sampler(setup, tiny_pipeline, tmp_path, capsys):
    """--sampling_unet/--scheduler/--timestep_spacing reach every cell: the standard image is what plain diffusers
    makes with the swapped UNet and that scheduler; the sweep's settings refuse a rerun with another sampler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from golden_noise.testing.pipelines import build_tiny_sdxl_pipeline

    fast = build_tiny_sdxl_pipeline(seed=7).unet
    save_file({k: v.contiguous() for k, v in fast.state_dict().items()}, tmp_path / "fast_unet.safetensors")
    sampler = ["--sampling_unet", tmp_path / "fast_unet.safetensors", "--scheduler", "euler", "--timestep_spacing",
               "trailing"]
    out = tmp_path / "out"
    args = sweep_args(setup, out, *sampler, scales=(1.0,), methods=("standard", "gnsnet"),
                      metrics=[f"{setup['rewards']}:Brightness"])
    code, _, err = sweep(capsys, *args)
    assert code == 0, err
    ref = StableDiffusionXLPipeline.from_pipe(tiny_pipeline, unet=fast)
    ref.scheduler = EulerDiscreteScheduler.from_config(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    ref.set_progress_bar_config(disable=True)
    images = ref(PROMPTS[:1], generator=[torch.Generator().manual_seed(START_SEED)], num_inference_steps=STEPS,
                 guidance_scale=1.0).images
    assert np.array_equal(np.asarray(Image.open(folder(out, "standard", 1.0) / "0.png").convert("RGB")),
                          np.asarray(images[0]))
    settings = json.loads((out / "sweep_settings.json").read_text())
    assert settings["sampling_unet"].endswith("fast_unet.safetensors") and settings["timestep_spacing"] == "trailing"
    before = tree(out)
    code, _, err = sweep(capsys, *[a for a in args if str(a) not in map(str, sampler[:2])])
    assert code == 2 and "sampling_unet" in err.strip().splitlines()[-1] and tree(out) == before


CHECKED_REWARD = '''
from pathlib import Path


class Weighted:
    """A reward that needs its weights file (--reward_path Weighted=FILE): a wrong path fails when it is built."""

    def __init__(self, path=None):
        self.weight = float(Path(path).read_text())

    def score(self, images, prompts):
        return [self.weight for _ in images]
'''


def test_a_bad_reward_path_fails_before_anything_is_written(setup, tmp_path, capsys):
    """Issue 20 item 10: a --reward_path that cannot be loaded is refused before the sweep writes a file or loads a
    pipeline, so the corrected rerun into the same folder runs (it used to fail after the images and settings, and
    the corrected rerun was then refused as "another reward")."""
    rewards = tmp_path / "weighted.py"
    rewards.write_text(CHECKED_REWARD, encoding="utf-8")
    weights = tmp_path / "weight.txt"
    weights.write_text("0.25", encoding="utf-8")
    out = tmp_path / "out"
    args = sweep_args(setup, out, scales=(1.0,), methods=("standard",), metrics=[f"{rewards}:Weighted"])
    code, _, err = sweep(capsys, *args, "--reward_path", f"Weighted={tmp_path / 'missing.txt'}")
    assert code == 2 and "Weighted: building it raised" in err and "missing.txt" in err, err
    assert not [p for p in out.rglob("*") if p.name != ".lock"]  # no settings, prompts, cells or scores
    code, _, err = sweep(capsys, *args, "--reward_path", f"Weighted={weights}")
    assert code == 0, err
    assert {r["mean"] for r in read_csv(out / "sweep.csv")} == {"0.25"}


def test_a_warning_shared_by_every_cell_is_logged_once(setup, tmp_path, capsys):
    """Issue 21 item 6: the RNN was trained on n = 3; --num_gen_steps 1 2 at two guidance scales runs 4 gnsnet
    units, and each n is warned about once (not once per unit), as is the note that guidance 1 means no CFG."""
    out = tmp_path / "out"
    code, _, err = sweep(capsys, *sweep_args(setup, out, methods=("standard", "gnsnet"),
                                             metrics=[f"{setup['rewards']}:Brightness"]))
    assert code == 0, err
    for n in NS:
        assert err.count(f"--num_gen_steps {n} differs from the 3 steps") == 1, err
    assert err.count("--guidance_scale 1 <= 1: diffusers applies no classifier-free guidance") == 1, err
    assert err.count("Running batch inference") == 6  # what differs per unit is still said per unit


def _rows(cells: list[tuple]) -> list[dict]:
    """sweep.csv rows (as table_rows makes them) for (steps, w, method, n, mean, diff, ci_low, ci_high)."""
    from golden_noise.sweep.table import COLUMNS

    rows = []
    for steps, w, method, n, mean, diff, low, high in cells:
        r = dict.fromkeys(COLUMNS)
        r.update(guidance_scale=w, num_inference_steps=steps, num_gen_steps=n, method=method, metric="reward", n=8,
                 mean=mean, mean_ci_low=mean - 0.01, mean_ci_high=mean + 0.01, diff=diff, ci_low=low, ci_high=high,
                 win_rate=None if diff is None else 0.5, tuned_guidance_scale=w, unet_evals_per_image=steps + (n or 0),
                 seconds_per_image=0.01, selection_bias="")
        if method == "gnsnet":
            r.update(diff_vs_oracle=0.0, ci_low_vs_oracle=-0.001, ci_high_vs_oracle=0.001)
        rows.append(r)
    return rows


def test_share_of_oracle_gain_is_a_dash_where_the_oracle_gain_is_nothing(tmp_path):
    """Issue 21 item 5: gnsnet's share of the oracle's gain is given only where the oracle's gain CI excludes 0;
    elsewhere sweep.csv has an empty cell and the report a dash (no -2781% / 827%)."""
    from golden_noise.sweep.report import write_report
    from golden_noise.sweep.table import _oracle_shares, write_csv

    rows = _rows([(4, 1.0, "standard", None, 0.80, None, None, None),
                  (4, 1.0, "gnsnet", 2, 0.90, 0.10, 0.08, 0.12), (4, 1.0, "oracle", 2, 0.91, 0.11, 0.09, 0.13),
                  (4, 5.5, "standard", None, 0.99, None, None, None),
                  (4, 5.5, "gnsnet", 2, 0.99, -0.0028, -0.004, -0.001),
                  (4, 5.5, "oracle", 2, 0.99, 0.0001, -0.0010, 0.0012)])
    _oracle_shares(rows)
    shares = [r["share_of_oracle_gain"] for r in rows if r["method"] == "gnsnet"]
    assert shares[0] == pytest.approx(0.10 / 0.11) and shares[1] is None
    write_csv(tmp_path / "sweep.csv", rows)
    assert [r["share_of_oracle_gain"] for r in read_csv(tmp_path / "sweep.csv")] == ["", "0.9090909090909092",
                                                                                     "", "", "", ""]
    write_report(tmp_path / "report.html", rows, [], [], {}, "t", "s")
    page = (tmp_path / "report.html").read_text()
    assert "<td class='num'>91%</td>" in page and "<td class='num'>—</td>" in page and "-2800%" not in page
    assert "where the oracle's own gain CI contains 0: w=5.5, 4 steps, n=2" in page


def test_findings_are_a_table_of_grouped_cells(tmp_path):
    """Issue 21 item 5: the findings list, per method and n, the cells grouped by step count (one line each), in a
    table, instead of one run-on sentence per method."""
    from golden_noise.sweep.report import findings, write_report

    cells = []
    for steps in (4, 20):
        for w in (1.0, 1.5, 2.0):
            cells += [(steps, w, "standard", None, 0.8, None, None, None),
                      (steps, w, "gnsnet", 1, 0.9, 0.05, 0.01, 0.09), (steps, w, "oracle", 1, 0.9, 0.05, 0.01, 0.09)]
    rows = _rows(cells)
    found = findings(rows)[0]
    gnsnet = next(s for s in found.series if s.series == "gnsnet n=1")
    assert gnsnet.gains == ["4 steps: w = 1, 1.5, 2", "20 steps: w = 1, 1.5, 2"] and gnsnet.losses == []
    write_report(tmp_path / "report.html", rows, [], [], {}, "t", "s")
    page = (tmp_path / "report.html").read_text()
    findings_html = page.split("<h2>Findings</h2>")[1].split("<h2>")[0]
    assert "<th>gain over standard (95% CI above 0)</th>" in findings_html
    assert "<td>gnsnet n=1</td><td>4 steps: w = 1, 1.5, 2<br>20 steps: w = 1, 1.5, 2</td>" in findings_html


def test_report_is_self_contained_and_its_image_tables_fit_the_window(reference, tmp_path):
    """Issue 21 item 5: report.html embeds its images as thumbnails, so the report copied without the cells still
    shows every image (its plots are the PNGs beside it); image tables share the window's width (fixed layout,
    images at most 100% of their cell) instead of overflowing it."""
    import re
    import shutil

    copy = tmp_path / "copied"
    copy.mkdir()
    for p in reference["out"].iterdir():
        if p.is_file():
            shutil.copy(p, copy / p.name)
    page = (copy / "report.html").read_text()
    sources = re.findall(r"<img [^>]*src='([^']+)'", page)
    images = [s for s in sources if s.startswith("data:image/png;base64,")]
    assert len(images) >= 12 * min(4, len(INDICES))
    assert all(s.startswith("data:") or (copy / s).is_file() for s in sources)
    assert "table.images{table-layout:fixed;width:100%}" in page and "max-width:192px" in page
    assert page.count("<table class='images'>") == 2 * len(SCALES) // 2


def test_one_guidance_scale_plots_reward_against_steps(tmp_path, monkeypatch):
    """Issue 21 item 5: a sweep with one guidance scale (the student sweep) plots reward and gain against the step
    count (reward_vs_steps), each series at its own x offset, instead of a degenerate reward-vs-guidance plot."""
    import golden_noise.sweep.plots as plots

    figures = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or real(fig, path))
    cells = []
    for steps in (1, 2, 4):
        cells += [(steps, 1.0, "standard", None, 0.9, None, None, None),
                  (steps, 1.0, "gnsnet", 1, 0.92, 0.02, 0.01, 0.03), (steps, 1.0, "gnsnet", 2, 0.92, 0.02, 0.01, 0.03),
                  (steps, 1.0, "oracle", 2, 0.92, 0.02, 0.01, 0.03)]
    paths = plots.write_plots(_rows(cells), tmp_path)
    assert [p.name for p in paths] == ["reward_vs_steps_reward.png", "reward_vs_cost_reward.png",
                                       "gain_vs_rollout_reward.png"]
    top, bottom = figures[0].axes
    assert [t.get_text() for t in bottom.get_xticklabels()] == ["1", "2", "4"]
    xs = [tuple(bars.lines[0].get_xdata()) for bars in top.containers]  # each series' points (errorbar data line)
    assert len(xs) == 4 and len(set(xs)) == 4  # four series, none drawn over another
    assert all(-0.5 < x[0] < 0.5 and 0.5 < x[1] < 1.5 for x in xs)


# ---------------------------------------------------------------- K separate runs (machines) into one folder
def test_three_tasks_in_turn_equal_one_sweep(reference, setup, tmp_path, capsys, monkeypatch):
    """--num_shards 3 (2 global batches of 2 prompts): task 2 has no batch and task 0 makes batch 0 of every unit;
    neither writes sweep.csv, and --finalize names the missing batch in one line (exit 2); task 1, placed by Slurm's
    array variables, completes every unit, scores the cells and writes the same sweep.csv and images as one run.
    --finalize then makes no image and writes the same sweep.csv again."""
    from tests.test_inference import run_in_process

    cli = load_cli(SCRIPT)
    out = tmp_path / "tasks"
    args = [str(a) for a in sweep_args(setup, out)]
    with UNetRows() as counted:
        for i in (2, 0):
            result = cli.main(cli.parse_args([*args, "--num_shards", "3", "--shard_index", str(i)]))
            assert (result["num_shards"], result["shard_index"]) == (3, i) and "table" not in result
            assert len(result["missing"]) == 12 and not (out / "sweep.csv").exists()
    assert 0 < counted.rows < reference["rows"]
    made = sorted(p.relative_to(out).as_posix() for p in out.glob("cells/**/*.png"))
    assert made and {Path(p).stem for p in made} == {"0", "1"}  # global batch 0 of every unit
    code, err = run_in_process(cli, [*args, "--finalize"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: --finalize: 24 of 48 images of 12 of 12 units are missing (global batch(es) 1; "
                          f"e.g. cells/w1.0_s{STEPS}/standard_output/3.png) in {out}: rerun the task(s)"), err
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    result = cli.main(cli.parse_args(args))  # task 1 of 3, from the Slurm array's variables
    assert "missing" not in result and "best_of_2" in result["table"]
    drop = ("seconds_per_image",)
    assert read_csv(out / "sweep.csv", drop) == read_csv(reference["out"] / "sweep.csv", drop)
    images = {k: v for k, v in tree(reference["out"]).items() if k.endswith(".png") and k.startswith("cells/")}
    assert {k: v for k, v in tree(out).items() if k in images} == images
    for name in ("sweep_settings.json", "prompts.txt"):
        assert (out / name).read_bytes() == (reference["out"] / name).read_bytes(), name
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    (out / "sweep.csv").unlink()
    with UNetRows() as finalized:
        code, err = run_in_process(cli, [*args, "--finalize"], capsys)
    assert code == 0 and finalized.rows == 0, err
    assert read_csv(out / "sweep.csv", drop) == read_csv(reference["out"] / "sweep.csv", drop)


def test_a_task_stopped_before_merging_a_unit_is_finalized(reference, setup, tmp_path, capsys):
    """Every image there, one unit's manifest never merged (its last run was stopped between its images and the
    merge): --finalize merges it and writes the table."""
    import shutil

    from tests.test_inference import run_in_process

    out = tmp_path / "sweep"
    shutil.copytree(reference["out"], out)
    unit = out / "cells" / f"w3.0_s{STEPS}"
    rows = (unit / "manifest.csv").read_text(encoding="utf-8").splitlines()
    parts = unit / ".manifest_parts"
    parts.mkdir()
    listed = read_csv(unit / "manifest.csv")
    (parts / "task0-rank0-1.jsonl").write_text("".join(json.dumps({**r, "index": int(r["index"]), "seconds": 0.1,
                                                                   "noise_seconds": 0.0, "sampling_seconds": 0.1,
                                                                   "unet_evals": float(r["unet_evals"])}) + "\n"
                                                       for r in listed), encoding="utf-8")
    (unit / "manifest.csv").unlink()
    (out / "sweep.csv").unlink()
    cli = load_cli(SCRIPT)
    code, err = run_in_process(cli, [*map(str, sweep_args(setup, out)), "--finalize"], capsys)
    assert code == 0, err
    assert (unit / "manifest.csv").read_text(encoding="utf-8").splitlines() == rows
    drop = ("seconds_per_image",)
    assert read_csv(out / "sweep.csv", drop) == read_csv(reference["out"] / "sweep.csv", drop)


@pytest.mark.slow  # three sweeps at once, a kill and a rerun, as separate processes: about a minute on 2 busy cores
def test_three_machines_one_killed_equal_one_sweep(setup, tmp_path, capsys):
    """K = 3 sweeps as separate processes (no launcher, no communication) into one folder, task 1 killed with -9
    mid-run: the others finish, say what is missing and write no table; --finalize names the missing batch; task 1
    rerun alone completes every unit and writes the same sweep.csv and images as one single run."""
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT
    from tests.test_batch_inference import three_tasks_one_killed
    from tests.test_inference import run_in_process

    prompts = setup["root"] / "eleven.txt"  # 11 lines, line 2 blank: global batches of 4 hold 0-4, 5-8, 9-10
    prompts.write_text("\n".join([*PROMPTS, "a fox", "an owl", "a boat", "a map", "a cup", "a key"]) + "\n",
                       encoding="utf-8")
    single, out = tmp_path / "single", tmp_path / "machines"

    def args(folder: Path) -> list[str]:
        return [str(a) for a in sweep_args({**setup, "prompt_file": prompts}, folder, scales=(1.0, 3.0),
                                           methods=("standard", "gnsnet", "oracle"), batch_size=4)]

    cli = load_cli(SCRIPT)
    cli.main(cli.parse_args(args(single)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    # task 1 (prompts 5-8) is killed once its first image is there
    codes, errs = three_tasks_one_killed([sys.executable, str(ROOT / SCRIPT), *args(out)], env,
                                         lambda: any(out.glob("cells/*/*_output/[5678].png")), timeout=600)
    for i in (0, 2):
        assert codes[i] == 0, errs[i][-3000:]
        assert f"task {i} of 3 done; " in errs[i] and "units are missing (global batch(es) " in errs[i], errs[i][-3000:]
    assert not (out / "sweep.csv").exists()
    made = [p for p in out.glob("cells/**/*.png") if int(p.stem) in (5, 6, 7, 8)]
    assert 1 <= len(made) < 40  # mid-run: 4 prompts of batch 1 in each of 10 units
    code, err = run_in_process(cli, [*args(out), "--finalize"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "(global batch(es) 1;" in err, err
    rerun = subprocess.run([sys.executable, str(ROOT / SCRIPT), *args(out), "--num_shards", "3", "--shard_index",
                            "1"], capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    drop = ("seconds_per_image",)
    assert read_csv(out / "sweep.csv", drop) == read_csv(single / "sweep.csv", drop)
    images = {k: v for k, v in tree(single).items() if k.endswith(".png") and k.startswith("cells/")}
    assert len(images) == 10 * 10 and {k: v for k, v in tree(out).items() if k in images} == images
    assert not list(out.rglob(".*.tmp"))
