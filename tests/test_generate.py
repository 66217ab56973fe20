"""Stage 2 end to end: the sequence dataset, determinism, multi-process, resume, refused reruns, repair of damaged
files, guidance flags and bad inputs. Most runs call the CLI in this process (`run_main`); the kill -9 and
two-process tests need real processes."""
from __future__ import annotations

import csv
import filecmp
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from golden_noise import layout
from golden_noise.prompts import prompt_fingerprint, read_prompts
from golden_noise.runtime import run_cli as run_in_process
from tests.conftest import ROOT, load_cli

SCRIPT = "src/generate_npd_series.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what `accelerate launch` gives each process: same float reductions


def run_main(capsys, script: str, *args) -> tuple[int, str, str]:
    """Run a CLI in this process as `python script args` runs it (runtime.run_cli): (exit code, stdout, stderr)."""
    cli = load_cli(script)
    try:
        code = run_in_process(cli.main, cli.parse_args, [str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    finally:
        for handler in logging.root.handlers[:]:  # setup_logging's handler writes to this test's captured stderr
            logging.root.removeHandler(handler)
    out = capsys.readouterr()
    return code, out.out, out.err


def prompts_file(tmp_path: Path, n: int, name="prompts.txt", blank_every: int = 0, word="shape") -> Path:
    lines = []
    for i in range(n):
        lines.append("" if blank_every and i % blank_every == blank_every - 1 else
                     f"a {['small', 'big'][i % 2]} {['red', 'green', 'blue'][i % 3]} {word} number {i}")
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def generate(capsys, pipe_dir, prompt_file, out, *extra) -> tuple[int, str, str]:
    return run_main(capsys, SCRIPT, "--prompt_file", prompt_file, "--output_dir", out, "--base_model_id", pipe_dir,
                    "--num_steps", 3, "--device", "cpu", *extra)


def generate_subprocess(pipe_dir, prompt_file, out, *extra):
    cmd = [sys.executable, str(ROOT / SCRIPT), "--prompt_file", prompt_file, "--output_dir", out, "--base_model_id",
           pipe_dir, "--num_steps", 3, "--device", "cpu", *extra]
    return list(map(str, cmd)), {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD}


def same_tree(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    if files_a != files_b:
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    return not mismatch and not errors


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """{relative path: (bytes, mtime_ns, inode)} of every file: a file rewritten even with the same bytes shows."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(root.rglob("*")) if p.is_file()}


def error_line(stderr: str) -> str:
    """The one error line of a failed run (runtime.run_cli's `error: ...` or argparse's `prog: error: ...`)."""
    lines = [line for line in stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_dataset_contents(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 7, blank_every=3)  # lines 2 and 5 are blank
    out = tmp_path / "ds"
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2)
    assert code == 0, stderr
    assert "UNet evaluations per golden step: 3.0" in stdout
    rows = list(csv.DictReader(open(out / "metadata.csv", encoding="utf-8")))
    assert [int(r["id"]) for r in rows] == [0, 1, 3, 4, 6]  # ids are line numbers; blanks skipped
    assert rows[2]["prompt"] == "a big red shape number 3" and rows[2]["seed"] == "3"
    assert rows[0]["golden_sequence_file"] == layout.sample_files(0)["golden_sequence_file"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["latent_shape"] == [4, 16, 16] and config["num_steps"] == 3
    assert config["golden"]["t0"] == 901 and config["golden"]["denoise_guidance_scale"] == 5.5
    assert config["text_embedding"] == {"kind": "pooled", "dim": 32, "source": "text_encoder_2"}
    # what a rerun must match: the prompt list itself, the batch size and the device
    assert config["prompt_fingerprint"] == prompt_fingerprint(read_prompts(pf)) and config["num_prompts"] == 5
    assert config["batch_size"] == 2 and config["device_type"] == "cpu"
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


def test_batch_size_does_not_change_samples(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 6)
    a, b = tmp_path / "b1", tmp_path / "b4"
    assert generate(capsys, tiny_pipeline_dir, pf, a, "--batch_size", 1, "--storage_dtype", "float32")[0] == 0
    assert generate(capsys, tiny_pipeline_dir, pf, b, "--batch_size", 4, "--storage_dtype", "float32")[0] == 0
    for i in range(6):
        # the noise depends on the seed only: bit-identical
        assert torch.equal(torch.load(a / f"sequences/{i}_source.pt"), torch.load(b / f"sequences/{i}_source.pt"))
        torch.testing.assert_close(torch.load(a / f"sequences/{i}_golden_sequence.pt"),
                                   torch.load(b / f"sequences/{i}_golden_sequence.pt"), atol=1e-5, rtol=1e-5)
    assert (a / "metadata.csv").read_text() == (b / "metadata.csv").read_text()


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_two_processes_give_the_same_dataset_byte_for_byte(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 10)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert generate(capsys, tiny_pipeline_dir, pf, single, "--batch_size", 2)[0] == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / SCRIPT),
           "--prompt_file", pf, "--output_dir", multi, "--base_model_id", tiny_pipeline_dir, "--num_steps", 3,
           "--device", "cpu", "--batch_size", 2]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0 of 2" in proc.stdout  # really two processes, each with its own share
    assert same_tree(single, multi)


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_resume_after_kill_is_byte_identical(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 120)
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert generate(capsys, tiny_pipeline_dir, pf, fresh, "--batch_size", 2)[0] == 0
    cmd, env = generate_subprocess(tiny_pipeline_dir, pf, resumed, "--batch_size", 2)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((resumed / "sequences").glob("*_golden_sequence.pt"))) < 10 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((resumed / "sequences").glob("*_golden_sequence.pt")))
    assert 10 <= done_before < 120, "the run must be killed mid-way"
    assert not (resumed / "metadata.csv").exists()
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, resumed, "--batch_size", 2)
    assert code == 0, stderr
    assert "already complete" in stdout
    assert same_tree(fresh, resumed)


@pytest.fixture()
def finished(tmp_path, tiny_pipeline_dir, capsys):
    """A finished 5-prompt dataset (batch 2, float32 storage) and a snapshot of its files."""
    pf = prompts_file(tmp_path, 5)
    out = tmp_path / "ds"
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2, "--storage_dtype", "float32")
    assert code == 0, stderr
    return pf, out, snapshot(out)


@pytest.mark.parametrize("case", ["other_prompts", "fewer_prompts", "batch_size", "seed_and_guidance", "dtype"])
def test_rerun_with_other_prompts_or_settings_is_refused_and_changes_nothing(case, finished, tiny_pipeline_dir,
                                                                            tmp_path, capsys, monkeypatch):
    pf, out, before = finished
    flags = ["--batch_size", 2, "--storage_dtype", "float32"]
    named = {"other_prompts": ["prompt_fingerprint"], "fewer_prompts": ["num_prompts: 5 -> 3"],
             "batch_size": ["batch_size: 2 -> 3"], "seed_and_guidance": ["denoise_guidance_scale", "start_seed"],
             "dtype": ["storage_dtype: 'float32' -> 'float16'"]}[case]
    if case == "other_prompts":  # same count and indices, other text: what the prompt fingerprint is for
        pf = prompts_file(tmp_path, 5, name="other.txt", word="circle")
    elif case == "fewer_prompts":
        flags += ["--max_prompts", 3]
    elif case == "batch_size":
        flags[1] = 3
    elif case == "seed_and_guidance":
        flags += ["--denoise_guidance_scale", 7, "--start_seed", 5]
    else:
        flags[3] = "float16"
    # found before the model loads, so a refused rerun costs no model load
    monkeypatch.setattr("golden_noise.npd.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, out, *flags)
    assert code == 2
    line = error_line(stderr)
    assert "holds a dataset made with other inputs or settings" in line and "--output_dir" in line
    assert all(name in line for name in named), line
    assert snapshot(out) == before  # every file untouched: same bytes, same mtime, same inode


def test_longer_prompt_list_extends_the_dataset_exactly(tmp_path, tiny_pipeline_dir, capsys):
    """--max_prompts 7 then 10 (batch 4) equals a fresh 10-prompt run byte for byte: samples 4-6, computed in the
    partial batch [4, 7), are recomputed in their new batch [4, 8); samples 0-3 are kept as they are."""
    pf = prompts_file(tmp_path, 10)
    flags = ["--batch_size", 4, "--storage_dtype", "float32"]
    fresh, grown = tmp_path / "fresh", tmp_path / "grown"
    assert generate(capsys, tiny_pipeline_dir, pf, fresh, *flags)[0] == 0
    assert generate(capsys, tiny_pipeline_dir, pf, grown, *flags, "--max_prompts", 7)[0] == 0
    old = snapshot(grown)
    tail = [f"sequences/{i}_golden_sequence.pt" for i in (4, 5, 6)]
    # the point of recomputing: in the partial batch these sequences differ in the last bits
    assert any(old[f][0] != (fresh / f).read_bytes() for f in tail)
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, grown, *flags)
    assert code == 0, stderr
    assert "extends the dataset's 7 prompts to 10; 3 samples of the old last batch are recomputed" in stderr
    assert "10 complete samples" in stdout and "6 generated" in stdout and "4 already complete" in stdout
    assert same_tree(fresh, grown)
    now = snapshot(grown)
    assert all(now[f] == old[f] for f in old if f.startswith(("sequences/0_", "sequences/3_")))  # untouched
    # the recorded list is now the long one: going back to the short one is refused
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, grown, *flags, "--max_prompts", 7)
    assert code == 2 and "num_prompts: 10 -> 7" in error_line(stderr)


def test_truncated_and_unreadable_files_are_regenerated_and_nothing_else_changes(finished, tiny_pipeline_dir,
                                                                                 capsys):
    pf, out, before = finished
    golden, text = "sequences/3_golden_sequence.pt", "sequences/1_text.pt"
    (out / golden).write_bytes(before[golden][0][:300])  # truncated: it counted as complete before
    (out / text).write_bytes(b"not a tensor file")       # unreadable
    assert not layout.tensor_file_intact(out / golden) and layout.tensor_file_intact(out / "sequences/3_source.pt")
    damaged = snapshot(out)
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2, "--storage_dtype",
                                    "float32")
    assert code == 0, stderr
    assert "2 sample files are truncated or unreadable and are regenerated" in stderr
    assert "2 generated" in stdout and "2 damaged files regenerated" in stdout
    after = snapshot(out)
    assert after.keys() == before.keys()
    for f in (golden, text):  # regenerated byte for byte
        assert after[f][0] == before[f][0]
    for f in set(before) - {golden, text}:  # every other file, metadata.csv and run_config.json too, untouched
        assert after[f] == damaged[f], f


def test_guidance_scales(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 2)
    for flag in ("--denoise_guidance_scale", "--inversion_guidance_scale"):
        code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, tmp_path / "neg", flag, -0.5)
        assert code == 2 and f"{flag} must not be negative, got -0.5" in error_line(stderr)
    assert not (tmp_path / "neg").exists()
    out = tmp_path / "ds"
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--denoise_guidance_scale", 0.5,
                                    "--inversion_guidance_scale", 0)
    assert code == 0, stderr
    # w_l = 0.5 runs both branches (2 evaluations), w_w = 0 the unconditional one alone (1): 3 per step
    assert "UNet evaluations per golden step: 3.0" in stdout
    assert ("--denoise_guidance_scale 0.5: the golden step uses eps = eps_u + 0.5 (eps_c - eps_u) (UNet branches: "
            "uncond + cond)") in stderr
    assert "--inversion_guidance_scale 0: the golden step uses eps = eps_u (UNet branches: uncond)" in stderr
    assert stderr.count("unlike diffusers' sampling, where w <= 1 means 'no guidance'") == 2
    effective = json.loads((out / "run_config.json").read_text())["effective_guidance"]
    assert effective["denoise"] == {"scale": 0.5, "eps": "eps_u + 0.5 (eps_c - eps_u)", "branches": ["uncond", "cond"]}
    assert effective["inversion"] == {"scale": 0.0, "eps": "eps_u", "branches": ["uncond"]}
    assert "does not apply here" in effective["rule"]


@pytest.mark.parametrize("case", ["proc", "below_a_file"])
def test_unwritable_output_dir_is_refused_before_reading_prompts_or_loading_the_model(case, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = "/proc/golden-noise-test" if case == "proc" else tmp_path / "file" / "ds"
    # neither the prompt file nor the model exists: the output folder is checked first
    code, _, stderr = run_main(capsys, SCRIPT, "--prompt_file", tmp_path / "missing.txt", "--output_dir", out,
                               "--base_model_id", tmp_path / "no-model")
    assert code == 2
    line = error_line(stderr)
    assert line.startswith(f"error: --output_dir {out} is not a writable folder") and "choose another" in line


@pytest.mark.parametrize("case,pattern", [
    ("missing", "does not exist"),
    ("empty", "holds no prompts"),
    ("non_utf8", "line 2 is not valid UTF-8"),
    ("size", "--height 20 must be a positive multiple of 8"),
    ("model", "cannot load --base_model_id"),
])
def test_bad_inputs(tmp_path, tiny_pipeline_dir, case, pattern, capsys):
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
    code, _, stderr = run_main(capsys, SCRIPT, "--prompt_file", pf, "--output_dir", out, "--base_model_id", model,
                               "--device", "cpu", *extra)
    assert code == 2
    assert pattern in error_line(stderr)
    assert not (out / "metadata.csv").exists() and not list(out.rglob("*.pt"))


def test_long_prompts_warn_once_with_a_count(tmp_path, tiny_pipeline_dir, capsys):
    pf = tmp_path / "long.txt"
    pf.write_text("short one\n" + "many words " * 40 + "\n" + "more words " * 40 + "\n", encoding="utf-8")
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, tmp_path / "ds")
    assert code == 0
    assert stderr.count("exceed the 77-token CLIP window") == 1
    assert "2 of 3 prompts exceed" in stderr


def test_full_disk_is_a_clear_error_and_leaves_complete_samples(tmp_path, tiny_pipeline_dir, capsys):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)]).returncode != 0:
        pytest.fail("this test needs root to mount a small tmpfs (CI runs as root)")
    try:
        pf = prompts_file(tmp_path, 40)
        out = mount / "ds"
        code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2)
        assert code == 2
        assert "no space left on device while writing" in error_line(stderr)
        assert not list(out.rglob(".*.tmp"))
        for seq in (out / "sequences").glob("*_golden_sequence.pt"):  # every visible file loads
            assert torch.load(seq, weights_only=True).shape == (3, 4, 16, 16)
    finally:
        subprocess.run(["umount", str(mount)])


def test_tensor_file_check_finds_every_truncation(tmp_path):
    """layout.tensor_file_intact, the resume scan's check: every proper prefix of a tensor file, a foreign pickle,
    an empty file and a folder fail; whole files of every size (zip64 end records included) pass."""
    import pickle

    from golden_noise.io import atomic_torch_save

    for shape in [(1,), (3, 4, 16, 16), (2, 4, 128, 128)]:
        path = tmp_path / f"{len(shape)}.pt"
        atomic_torch_save(torch.randn(shape).half(), path)
        whole = path.read_bytes()
        assert layout.tensor_file_intact(path)
        step = max(1, len(whole) // 500)  # about 500 prefixes, always including the last few bytes
        for n in list(range(0, len(whole), step)) + list(range(len(whole) - 120, len(whole))):
            path.write_bytes(whole[:n])
            assert not layout.tensor_file_intact(path), (shape, n)
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(torch.zeros(3)))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    for bad in ("pickle.pt", "empty.pt", "missing.pt", "folder.pt"):
        assert not layout.tensor_file_intact(tmp_path / bad)
