"""The bench scripts run in their quick modes and print sane ratios; the GPU check runs end to end on CPU
(--tiny); the stage-2 speed options (--channels_last, --compile) leave the golden sequences unchanged."""
from __future__ import annotations

import json
import math
import os
import subprocess
from contextlib import contextmanager

import pytest
import torch

from tests.conftest import ROOT, run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def bench(script: str, tmp_path, *args) -> tuple[dict, str]:
    out = tmp_path / f"{script.split('/')[-1]}.json"
    proc = run_cli(script, *args, "--json", out, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@contextmanager
def one_thread():
    """torch on one thread: on busy shared cores two OpenMP threads stall each other (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_sh(script: str, *args, env: dict) -> subprocess.CompletedProcess:
    """Run `bash <repo>/<script> args...` (text output)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD, **env}
    return subprocess.run(["bash", str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=str(ROOT), timeout=600)


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_generation_bench_counts_evaluations_and_times_the_unet(tmp_path):
    res, stdout = bench("bench/bench_generation.py", tmp_path, "--quick")
    r = res["ratios"]
    # counted, not assumed: 3 UNet evaluations per golden step when w_w is 0 or 1, 4 otherwise
    assert r["unet_evaluations_per_golden_step[w_w=0]"] == 3
    assert r["unet_evaluations_per_golden_step[w_w=1]"] == 3
    assert r["unet_evaluations_per_golden_step[w_w=2]"] == 4
    assert r["throughput_vs_batch_1[batch=1]"] == 1
    rows = {(row["memory_format"], row["batch"], row["w_w"]): row for row in res["rows"]}
    base = rows[("contiguous", 1, 1.0)]["samples_per_s"]
    for b in (1, 2, 4, 8):
        assert 0.3 < r[f"unet_share_of_wall_time[batch={b}]"] <= 1.0
        # each ratio is the quotient of the two throughputs measured in this run (not an estimate)
        assert r[f"throughput_vs_batch_1[batch={b}]"] == pytest.approx(rows[("contiguous", b, 1.0)]["samples_per_s"]
                                                                       / base)
    assert r["channels_last_vs_contiguous[batch=4]"] == pytest.approx(
        rows[("channels_last", 4, 1.0)]["samples_per_s"] / rows[("contiguous", 4, 1.0)]["samples_per_s"])
    assert [row["evals_per_step"] for row in res["rows"]] == [3] * 5 + [4]  # the last: w_w = 2
    assert r["needed_branches_only_speedup[batch=4, w_w=1 vs 2]"] == pytest.approx(
        rows[("contiguous", 4, 1.0)]["samples_per_s"] / rows[("contiguous", 4, 2.0)]["samples_per_s"])
    assert "ratios:" in stdout and "unet_share_of_wall_time[batch=8] = " in stdout
    assert "[ok] 3 UNet evaluations per golden step" in stdout and "[ok] 4 UNet evaluations" in stdout


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_inference_bench_counts_sdxl_flops_and_the_rollout_fraction(tmp_path):
    res, stdout = bench("bench/bench_inference.py", tmp_path, "--quick")
    f = res["flops"]
    assert f["unet_forward_tflops"] == pytest.approx(6.76, rel=0.01)  # SDXL's public config, meta device
    assert f["vae_decode_tflops"] == pytest.approx(10.5, rel=0.02)
    assert f["sampling_unet_tflops"] == pytest.approx(60 * f["unet_forward_tflops"])
    assert 0 < f["rollout_fraction"] <= 0.01  # the default RNN's 10-step rollout: <= 1% of the sampling
    assert f["rnn_config"]["gru_hidden_size"] == 1024 and f["rnn_config"]["noise_resolution"] == 128
    wall = res["tiny_wall_time"]
    assert wall["rollout_seconds"] > 0 and wall["sampling_seconds"] > 0 and wall["flop_ratio"] > 0
    assert "rollout_wall_time_vs_sampling[tiny pipeline] = " in stdout
    assert "[ok] rollout <= 1% of sampling FLOPs" in stdout


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_training_bench_prints_samples_per_second_and_loader_headroom(tmp_path):
    res, stdout = bench("bench/bench_training.py", tmp_path, "--quick")
    rows = {(r["size"], r["workers"]): r for r in res["rows"]}
    default = rows[("default@16", 0)]  # the default-size architecture on small latents
    assert default["cpu_train_samples_s"] > 0 and default["headroom"] == pytest.approx(
        default["loader_samples_s"] / default["cpu_train_samples_s"])
    assert res["ratios"]["default_model_small_latents_loader_headroom_workers0"] >= 3
    assert res["sdxl_model"]["parameters"] > 30e6 and 0 < res["sdxl_model"]["rollout_fraction_of_sdxl_sampling"] <= 0.01
    assert "[ok] default-size model on small latents: loader headroom >= 3" in stdout


@pytest.mark.slow
def test_memory_bench_reports_every_stage(tmp_path):
    res, stdout = bench("bench/bench_memory.py", tmp_path, "--quick")
    stages = {row["stage"]: row for row in res["stages"]}
    assert len(stages) == 5 and "peak memory per stage" in stdout
    assert stages["imports only (baseline)"]["status"] == "ok"
    assert stages["2 generation"]["status"] == "ok"
    for row in res["stages"]:
        # a stage whose CLI is not ready says so instead of failing the bench
        assert row["status"] == "ok" or row["status"].startswith("not available")
        if row["status"] == "ok":
            assert row["peak_rss_mib"] > 50 and row["cuda_max_allocated_mib"] is None


@pytest.mark.slow
def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    # through the shell script, as on the GPU machine (diffusers is installed here, so no wheels are needed)
    proc = run_sh("bench/gpu_check.sh", "--device", "cpu", "--tiny", "--batch_sizes", 1, 2, "--compare_batch", 2,
                      "--train_batch_size", 2, "--num_steps", 3, "--repeats", 1, "--compile_backend", "eager",
                      env={"OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").read_text().strip().endswith("skipped: nothing")
    sections = res["sections"]
    errors = {k: v["error"] for k, v in sections.items() if "error" in v}
    assert not errors and not res["skipped"]
    assert {"flops (meta device)", "golden step sweep float16", "golden step sweep bfloat16",
            "measured sequence float16", "channels_last", "VAE decode and sampling time", "RNN rollout vs sampling",
            "RNN training step", "torch.compile"} <= set(sections)
    for name in ("float16", "bfloat16"):
        rows = sections[f"golden step sweep {name}"]["rows"]
        assert [r["batch"] for r in rows] == [1, 2]
        assert all(r["unet_evals_per_step"] == 3 and r["sequences_per_hour"] > 0 and 0 < r["unet_share"] <= 1
                   for r in rows)
        assert rows[0]["sequences_per_hour"] == pytest.approx(3600 * rows[0]["golden_steps_per_s"] / 3)
    assert sections["measured sequence float16"]["finite"]
    compiled, channels_last = sections["torch.compile"], sections["channels_last"]
    assert compiled["speedup"] == pytest.approx(compiled["eager"]["seconds_per_step"]
                                                / compiled["compiled"]["seconds_per_step"])
    assert channels_last["speedup"] == pytest.approx(channels_last["contiguous"]["seconds_per_step"]
                                                     / channels_last["channels_last"]["seconds_per_step"])
    assert res["summary"]["compile_speedup"] == compiled["speedup"]
    assert sections["RNN training step"]["rows"][0]["seconds_per_step"] > 0
    assert math.isfinite(res["summary"]["rollout_vs_sampling_wall"])
    assert "goal_1500_sequences_per_hour_met" in res["summary"]


def test_channels_last_flag_leaves_the_dataset_unchanged(tmp_path, tiny_pipeline, tiny_pipeline_dir):
    from golden_noise.dataset.generate import GenerationSettings, generate_dataset
    from golden_noise.prompts import read_prompts
    from tests.conftest import dataset_samples

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na green shape\n", encoding="utf-8")
    cl, ref = tmp_path / "channels_last", tmp_path / "reference"
    proc = run_cli("src/generate_npd_series.py", "--prompt_file", prompts, "--output_dir", cl, "--base_model_id",
                   tiny_pipeline_dir, "--num_steps", 2, "--batch_size", 2, "--device", "cpu", "--storage_dtype",
                   "float32", "--channels_last", env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the default (contiguous) UNet in this process, same batches and settings
    settings = GenerationSettings(base_model_id=str(tiny_pipeline_dir), num_steps=2, dtype="float32",
                                  storage_dtype="float32", batch_size=2)
    with one_thread():
        generate_dataset(tiny_pipeline, read_prompts(prompts), ref, settings, progress=False)
    a, b = dataset_samples(ref), dataset_samples(cl)
    for i in range(3):
        torch.testing.assert_close(b[i]["golden"], a[i]["golden"], atol=1e-5, rtol=1e-5)
    # the speed options do not shape the data: run_config.json does not record them
    config = json.loads((cl / "run_config.json").read_text())
    assert not {"channels_last", "compile"} & set(config)


def test_compiled_unet_gives_the_same_golden_step():
    from golden_noise.diffusion import encode_prompts, optimize_unet, seeded_noise
    from golden_noise.golden import golden_step
    from golden_noise.testing.pipelines import build_tiny_sdxl_pipeline

    with one_thread():
        pipe = build_tiny_sdxl_pipeline(seed=0)  # its own copy: compiling changes the module in place
        cond = encode_prompts(pipe, ["a cat", "a dog"], height=16, width=16)
        x = seeded_noise([0, 1], (4, 16, 16))
        step = golden_step(pipe)
        eager = step(x, cond)
        unet = pipe.unet
        # the eager backend runs the same dynamo tracing as inductor without its minutes of C++ compilation
        assert optimize_unet(pipe.unet, channels_last=True, compile_unet=True, backend="eager") is unet
        assert pipe.unet is unet and type(unet).__name__ == "UNet2DConditionModel" and unet.dtype == torch.float32
        assert unet._compiled_call_impl is not None
        try:
            torch.testing.assert_close(step(x, cond), eager, atol=1e-5, rtol=1e-5)
        finally:
            torch._dynamo.reset()
        assert step.counter.rows == 2 * 3 * 2  # two calls, 3 evaluations per sample, 2 samples
