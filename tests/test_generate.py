"""Stage 2 end to end: the sequence dataset, determinism, multi-process, resume and bad inputs."""
from __future__ import annotations

import csv
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_cli

SCRIPT = "src/generate_npd_series.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what `accelerate launch` gives each process: same float reductions


def prompts_file(tmp_path: Path, n: int, name="prompts.txt", blank_every: int = 0) -> Path:
    lines = []
    for i in range(n):
        lines.append("" if blank_every and i % blank_every == blank_every - 1 else
                     f"a {['small', 'big'][i % 2]} {['red', 'green', 'blue'][i % 3]} shape number {i}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate(tmp_path, pipe_dir, prompt_file, out, *extra, env=None):
    return run_cli(SCRIPT, "--prompt_file", prompt_file, "--output_dir", out, "--base_model_id", pipe_dir,
                   "--num_steps", 3, "--device", "cpu", *extra, env={**ONE_THREAD, **(env or {})})


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    return not mismatch and not errors


def test_dataset_contents(tmp_path, tiny_pipeline_dir):
    pf = prompts_file(tmp_path, 7, blank_every=3)  # lines 2 and 5 are blank
    out = tmp_path / "ds"
    proc = generate(tmp_path, tiny_pipeline_dir, pf, out, "--batch_size", 2)
    assert proc.returncode == 0, proc.stderr
    assert "UNet evaluations per golden step: 3.0" in proc.stdout
    rows = list(csv.DictReader(open(out / "metadata.csv", encoding="utf-8")))
    assert [int(r["id"]) for r in rows] == [0, 1, 3, 4, 6]  # ids are line numbers; blanks skipped
    assert rows[2]["prompt"] == "a big red shape number 3" and rows[2]["seed"] == "3"
    config = json.loads((out / "run_config.json").read_text())
    assert config["latent_shape"] == [4, 16, 16] and config["num_steps"] == 3
    assert config["golden"]["t0"] == 901 and config["golden"]["denoise_guidance_scale"] == 5.5
    assert config["text_embedding"] == {"kind": "pooled", "dim": 32, "source": "text_encoder_2"}
    src = torch.load(out / rows[0]["source_noise_file"], weights_only=True)
    seq = torch.load(out / rows[0]["golden_sequence_file"], weights_only=True)
    text = torch.load(out / rows[0]["text_embedding_file"], weights_only=True)
    assert src.shape == (4, 16, 16) and seq.shape == (3, 4, 16, 16) and text.shape == (32,)
    assert src.dtype == seq.dtype == torch.float16
    # x_T is the seed's noise; the sequence moves away from it by a few percent per step
    torch.testing.assert_close(src.float(), torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)),
                               atol=2e-3, rtol=1e-3)
    rel = ((seq[0].float() - src.float()).norm() / src.float().norm()).item()
    assert 1e-3 < rel < 0.5
    assert not list(out.rglob("*.tmp"))


def test_batch_size_does_not_change_samples(tmp_path, tiny_pipeline_dir):
    pf = prompts_file(tmp_path, 6)
    a, b = tmp_path / "b1", tmp_path / "b4"
    assert generate(tmp_path, tiny_pipeline_dir, pf, a, "--batch_size", 1, "--storage_dtype", "float32").returncode == 0
    assert generate(tmp_path, tiny_pipeline_dir, pf, b, "--batch_size", 4, "--storage_dtype", "float32").returncode == 0
    for i in range(6):
        # the noise depends on the seed only: bit-identical
        assert torch.equal(torch.load(a / f"sequences/{i}_source.pt"), torch.load(b / f"sequences/{i}_source.pt"))
        torch.testing.assert_close(torch.load(a / f"sequences/{i}_golden_sequence.pt"),
                                   torch.load(b / f"sequences/{i}_golden_sequence.pt"), atol=1e-5, rtol=1e-5)
    assert (a / "metadata.csv").read_text() == (b / "metadata.csv").read_text()


def test_two_processes_give_the_same_dataset_byte_for_byte(tmp_path, tiny_pipeline_dir):
    pf = prompts_file(tmp_path, 10)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert generate(tmp_path, tiny_pipeline_dir, pf, single, "--batch_size", 2).returncode == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / SCRIPT),
           "--prompt_file", pf, "--output_dir", multi, "--base_model_id", tiny_pipeline_dir, "--num_steps", 3,
           "--device", "cpu", "--batch_size", 2]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0 of 2" in proc.stdout  # really two processes, each with its own share
    assert same_tree(single, multi)


def test_resume_after_kill_is_byte_identical(tmp_path, tiny_pipeline_dir):
    pf = prompts_file(tmp_path, 120)
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert generate(tmp_path, tiny_pipeline_dir, pf, fresh, "--batch_size", 2).returncode == 0
    cmd = [sys.executable, str(ROOT / SCRIPT), "--prompt_file", pf, "--output_dir", resumed, "--base_model_id",
           tiny_pipeline_dir, "--num_steps", 3, "--device", "cpu", "--batch_size", 2]
    proc = subprocess.Popen(list(map(str, cmd)), env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((resumed / "sequences").glob("*_golden_sequence.pt"))) < 10 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((resumed / "sequences").glob("*_golden_sequence.pt")))
    assert 10 <= done_before < 120, "the run must be killed mid-way"
    assert not (resumed / "metadata.csv").exists()
    again = generate(tmp_path, tiny_pipeline_dir, pf, resumed, "--batch_size", 2)
    assert again.returncode == 0, again.stderr
    assert "already complete" in again.stdout
    assert same_tree(fresh, resumed)


def test_rerun_with_other_parameters_is_refused(tmp_path, tiny_pipeline_dir):
    pf = prompts_file(tmp_path, 2)
    out = tmp_path / "ds"
    assert generate(tmp_path, tiny_pipeline_dir, pf, out).returncode == 0
    before = sorted(p.name for p in out.rglob("*"))
    proc = generate(tmp_path, tiny_pipeline_dir, pf, out, "--denoise_guidance_scale", 7, "--start_seed", 5)
    assert proc.returncode == 2
    assert "other parameters" in proc.stderr and "denoise_guidance_scale" in proc.stderr and "start_seed" in proc.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


@pytest.mark.parametrize("case,pattern", [
    ("missing", "does not exist"),
    ("empty", "holds no prompts"),
    ("non_utf8", "line 2 is not valid UTF-8"),
    ("size", "--height 20 must be a positive multiple of 8"),
    ("model", "cannot load --base_model_id"),
])
def test_bad_inputs(tmp_path, tiny_pipeline_dir, case, pattern):
    pf = prompts_file(tmp_path, 2)
    extra, model = [], tiny_pipeline_dir
    if case == "missing":
        pf = tmp_path / "nope.txt"
    elif case == "empty":
        pf.write_text("\n\n", encoding="utf-8")
    elif case == "non_utf8":
        pf.write_bytes(b"ok prompt\nbad \xc3\x28 prompt\n")
    elif case == "size":
        extra = ["--height", 20]
    elif case == "model":
        model = "no-such-org/no-such-model"
    out = tmp_path / "ds"
    proc = run_cli(SCRIPT, "--prompt_file", pf, "--output_dir", out, "--base_model_id", model, "--device", "cpu",
                   *extra, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and pattern in lines[0], proc.stderr
    assert not (out / "metadata.csv").exists() and not list(out.rglob("*.pt"))


def test_long_prompts_warn_once_with_a_count(tmp_path, tiny_pipeline_dir):
    pf = tmp_path / "long.txt"
    pf.write_text("short one\n" + "many words " * 40 + "\n" + "more words " * 40 + "\n", encoding="utf-8")
    proc = generate(tmp_path, tiny_pipeline_dir, pf, tmp_path / "ds")
    assert proc.returncode == 0
    assert proc.stderr.count("exceed the 77-token CLIP window") == 1
    assert "2 of 3 prompts exceed" in proc.stderr


def test_full_disk_is_a_clear_error_and_leaves_complete_samples(tmp_path, tiny_pipeline_dir):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)]).returncode != 0:
        pytest.fail("this test needs root to mount a small tmpfs (CI runs as root)")
    try:
        pf = prompts_file(tmp_path, 40)
        out = mount / "ds"
        proc = generate(tmp_path, tiny_pipeline_dir, pf, out, "--batch_size", 2)
        assert proc.returncode == 2
        assert "no space left on device while writing" in proc.stderr
        assert not list(out.rglob(".*.tmp"))
        for seq in (out / "sequences").glob("*_golden_sequence.pt"):  # every visible file loads
            assert torch.load(seq, weights_only=True).shape == (3, 4, 16, 16)
    finally:
        subprocess.run(["umount", str(mount)])
