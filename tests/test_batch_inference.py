"""Stage 5: scripts/batch_inference.py on the tiny offline pipeline: layout, manifest, equality with the plain
pipeline and with the golden step, 1 vs 2 processes, resume after an interrupt, bad inputs."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from golden_noise.diffusion import encode_prompts, seeded_noise
from golden_noise.golden import GoldenStep
from golden_noise.errors import UserError
from golden_noise.io import load_tensor
from tests.conftest import ROOT, run_cli
from tests.test_inference import TRAIN_GOLDEN, TRAIN_STEPS, load_cli, make_export, pixels

PROMPTS = ["a red apple on a table", "a blue car", "", "a cat wearing a hat", "synthwave city at sunset",
           "a lighthouse in a storm"]
INDICES = [0, 1, 3, 4, 5]               # line 2 is blank: skipped, but later indices keep their line numbers
BATCHES = [[0, 1], [3, 4], [5]]          # global batches of --batch_size 2
METHODS = ["standard", "gnsnet", "oracle"]
START_SEED, STEPS, SCALE = 1000, 3, 5.5
# Bit-equal results across runs need the same CPU thread count per process (accelerate uses 1 per process).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("batch")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    run = root / "run"
    make_export(run / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir)
    return {"root": root, "prompt_file": prompt_file, "export": run}


def batch_args(setup: dict, out: Path) -> list:
    return ["--prompt_file", setup["prompt_file"], "--output_base_dir", out, "--rnn_weights_path", setup["export"],
            "--methods", *METHODS, "--batch_size", 2, "--num_inference_steps", STEPS, "--guidance_scale", SCALE,
            "--start_seed", START_SEED, "--save_noise"]


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """One uninterrupted single-process run."""
    out = setup["root"] / "reference"
    run_cli("scripts/batch_inference.py", *batch_args(setup, out), "--device", "cpu", env=ONE_THREAD, check=True)
    return out


def outputs(out: Path) -> dict[str, bytes]:
    """Every image and noise file under `out`, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".png", ".pt")}


def manifest(out: Path, with_times: bool = False) -> list[dict]:
    with open(out / "manifest.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not with_times:
        rows = [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]
    return rows


def test_layout_manifest_summary(reference):
    for method in METHODS:
        assert sorted(p.name for p in (reference / f"{method}_output").iterdir()) == [f"{i}.png" for i in INDICES]
        assert sorted(p.name for p in (reference / "noise" / method).iterdir()) == [f"{i}.pt" for i in INDICES]
    rows = manifest(reference, with_times=True)
    assert [(int(r["index"]), r["method"]) for r in rows] == [(i, m) for i in INDICES for m in METHODS]
    for r in rows:
        i = int(r["index"])
        assert r["prompt"] == PROMPTS[i] and int(r["seed"]) == START_SEED + i
        assert r["file"] == f"{r['method']}_output/{i}.png" and float(r["seconds"]) > 0
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["num_processes"] == 1 and summary["num_prompts"] == 5 and summary["num_gen_steps"] == TRAIN_STEPS
    for method in METHODS:
        s = summary["methods"][method]
        assert (s["images"], s["generated_this_run"], s["skipped_existing"]) == (5, 5, 0)
        assert s["mean_sampling_seconds_per_image"] > 0
    assert summary["methods"]["gnsnet"]["mean_noise_seconds_per_image"] > 0
    settings = json.loads((reference / "batch_settings.json").read_text())
    assert settings["golden"] == TRAIN_GOLDEN.to_dict()  # the oracle follows the RNN's training data
    assert not (reference / ".manifest_parts").exists()


def test_standard_equals_plain_pipeline(reference, tiny_pipeline):
    """standard_output/{i}.png == pipe(prompts, generator=[manual_seed(start_seed + i)]) for its global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in BATCHES:
            generators = [torch.Generator().manual_seed(START_SEED + i) for i in batch]
            images = tiny_pipeline([PROMPTS[i] for i in batch], generator=generators, num_inference_steps=STEPS,
                                   guidance_scale=SCALE).images
            for i, image in zip(batch, images):
                assert np.array_equal(pixels(reference / "standard_output" / f"{i}.png"),
                                      np.asarray(image.convert("RGB"))), i
    finally:
        torch.set_num_threads(threads)


def test_oracle_and_gnsnet_noises(reference, setup, tiny_pipeline):
    """oracle = the shared core's golden step (the RNN's training parameters) applied n times to x_T;
    gnsnet = the RNN's rollout from x_T; standard = x_T."""
    from golden_noise import GoldenNoise

    pipe = tiny_pipeline
    gn = GoldenNoise.from_pretrained(setup["export"], pipe=pipe)
    step = GoldenStep(pipe.unet, pipe.scheduler.config, TRAIN_GOLDEN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in BATCHES:
            texts = [PROMPTS[i] for i in batch]
            x_T = seeded_noise([START_SEED + i for i in batch], (4, 16, 16))
            oracle = step.sequence(x_T, encode_prompts(pipe, texts), TRAIN_STEPS)[:, -1]
            gnsnet = gn.rollout(x_T, gn.text_embeddings(texts), TRAIN_STEPS)[:, -1]
            for k, i in enumerate(batch):
                saved = {m: load_tensor(reference / "noise" / m / f"{i}.pt") for m in METHODS}
                assert torch.equal(saved["standard"], x_T[k])
                torch.testing.assert_close(saved["oracle"], oracle[k], rtol=0, atol=1e-6)
                torch.testing.assert_close(saved["gnsnet"], gnsnet[k], rtol=0, atol=1e-6)
                assert not torch.allclose(saved["oracle"], x_T[k]) and not torch.allclose(saved["gnsnet"], x_T[k])
    finally:
        torch.set_num_threads(threads)


def test_two_processes_give_the_same_files(reference, setup):
    out = setup["root"] / "two_processes"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "scripts" / "batch_inference.py"), *map(str, batch_args(setup, out))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2  # really two processes, not two rank-0-of-1
    assert outputs(out) == outputs(reference)
    assert manifest(out) == manifest(reference)


def test_interrupted_run_resumes_to_the_same_result(reference, setup):
    """Ctrl-C a run after its first image, rerun the same command: same files and manifest as uninterrupted."""
    out = setup["root"] / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    cmd = [sys.executable, str(ROOT / "scripts" / "batch_inference.py"), *map(str, batch_args(setup, out)),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    deadline = time.monotonic() + 300
    while proc.poll() is None and not any(out.glob("*_output/*.png")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 0), err[-2000:]  # 0 only if it finished before the signal landed
    done = len(list(out.glob("*_output/*.png")))
    assert done >= 1
    if proc.returncode == 130:
        assert "rerun the same command to resume" in err
        assert done < len(INDICES) * len(METHODS)

    run_cli("scripts/batch_inference.py", *batch_args(setup, out), "--device", "cpu", env=ONE_THREAD, check=True)
    assert outputs(out) == outputs(reference)
    assert manifest(out) == manifest(reference)
    summary = json.loads((out / "summary.json").read_text())
    skipped = sum(s["skipped_existing"] for s in summary["methods"].values())
    generated = sum(s["generated_this_run"] for s in summary["methods"].values())
    assert (skipped, generated) == (done, len(INDICES) * len(METHODS) - done)
    assert not list(out.rglob(".*.tmp"))  # no temporary file left behind


def test_rerun_with_other_settings_is_refused(reference, setup):
    cli = load_cli("scripts/batch_inference.py")
    before = outputs(reference)
    args = [str(a) for a in batch_args(setup, reference)]
    args[args.index("--guidance_scale") + 1] = "7.0"
    with pytest.raises(UserError, match=r"other settings \(guidance_scale: 5.5 -> 7.0\)"):
        cli.main(cli.parse_args([*args, "--device", "cpu"]))
    assert outputs(reference) == before


def test_bad_inputs(setup, tiny_pipeline, tiny_pipeline_dir, tmp_path, capsys):
    cli = load_cli("scripts/batch_inference.py")
    base = ["--output_base_dir", str(tmp_path / "out"), "--base_model_id", str(tiny_pipeline_dir),
            "--device", "cpu", "--num_inference_steps", "2"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no prompts"):
        cli.main(cli.parse_args(["--prompt_file", str(empty), "--methods", "standard", *base]))
    with pytest.raises(UserError, match="does not exist"):
        cli.main(cli.parse_args(["--prompt_file", str(tmp_path / "none.txt"), *base]))
    with pytest.raises(UserError, match="needs --rnn_weights_path"):
        cli.main(cli.parse_args(["--prompt_file", str(setup["prompt_file"]), "--methods", "gnsnet", *base]))
    with pytest.raises(UserError, match="does not exist"):
        cli.main(cli.parse_args(["--prompt_file", str(setup["prompt_file"]), *base,
                                 "--rnn_weights_path", str(tmp_path / "no_run")]))
    small = make_export(tmp_path / "small", tiny_pipeline, tiny_pipeline_dir, noise_resolution=8)
    with pytest.raises(UserError, match=r"latents \[4, 8, 8\]"):
        cli.main(cli.parse_args(["--prompt_file", str(setup["prompt_file"]), *base, "--rnn_weights_path", str(small),
                                 "--height", "16", "--width", "16"]))
    for bad in (["--scheduler", "plms"], ["--methods", "golden"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--prompt_file", str(setup["prompt_file"]), *bad])
        assert e.value.code == 2
    assert "invalid choice: 'plms'" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.png")) if (tmp_path / "out").exists() else True
