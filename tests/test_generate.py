"""Stage 2 end to end: the sharded dataset, determinism, multi-process and multi-machine runs, resume, refused
reruns, repair of damaged files and shards, guidance flags, non-finite values, the run lock and bad inputs. Most runs
call the CLI in this process (`run_main`); the kill -9, lock, multi-machine and two-process tests need real
processes."""
from __future__ import annotations

import filecmp
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from golden_noise.dataset import format as F
from golden_noise.dataset.generate import EARLY_KEYS, SIGNATURE_KEYS, GenerationSettings
from golden_noise.runs import Task
from golden_noise.dataset.writer import SampleSpec, read_batch
from golden_noise.errors import UserError
from golden_noise.io import tensor_bytes, tensor_file_intact, tensor_file_problem
from golden_noise.prompts import prompt_fingerprint, read_prompts
from golden_noise.runtime import run_cli as run_in_process
from tests.conftest import ROOT, dataset_samples, load_cli

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


def files_of(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != ".lock")


def same_tree(a: Path, b: Path) -> bool:
    """The same files with the same bytes (the run lock's file aside)."""
    if files_of(a) != files_of(b):
        return False
    match, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_of(a)], shallow=False)
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
    assert "UNet evaluations per golden step: 3.0" in stdout and "index.json written" in stdout
    # the finished dataset: run_config, the index, the card and the shards; the staging area is gone
    assert files_of(out) == [Path("README.md"), Path("data/shard-00000.parquet"), Path("index.json"),
                             Path("run_config.json")]
    samples = dataset_samples(out)
    assert sorted(samples) == [0, 1, 3, 4, 6]  # ids are line numbers; blanks skipped
    assert samples[3]["prompt"] == "a big red shape number 3" and samples[3]["seed"] == 3
    config = json.loads((out / "run_config.json").read_text())
    assert config["format_version"] == 2 and config["latent_shape"] == [4, 16, 16] and config["num_steps"] == 3
    assert config["golden"]["t0"] == 901 and config["golden"]["denoise_guidance_scale"] == 5.5
    assert config["text_embedding"] == {"kind": "pooled", "dim": 32, "source": "text_encoder_2"}
    # what a rerun must match: the prompt list itself, the batch size, the device and the sharding
    assert config["prompt_fingerprint"] == prompt_fingerprint(read_prompts(pf)) and config["num_prompts"] == 5
    assert config["batch_size"] == 2 and config["device_type"] == "cpu"
    per_sample = 2 * (4 * 16 * 16 * 4 + 32)  # x_T and 3 steps, 16-bit, and the text embedding
    assert config["sharding"]["samples_per_shard"] == F.SHARD_BYTES // per_sample // 2 * 2
    assert config["sharding"]["rows_per_group"] == F.ROW_GROUP_BYTES // per_sample
    index = json.loads((out / "index.json").read_text())
    shard = out / "data/shard-00000.parquet"
    assert index["num_samples"] == 5 and index["shards"] == [{
        "file": "data/shard-00000.parquet", "shard": 0, "first_id": 0, "last_id": 6, "rows": 5,
        "bytes": shard.stat().st_size, "sha256": __import__("hashlib").sha256(shard.read_bytes()).hexdigest()}]
    assert set(SIGNATURE_KEYS) - {"scoring"} <= set(config) and set(EARLY_KEYS) <= set(SIGNATURE_KEYS)  # unscored
    src, seq, text = samples[0]["source"], samples[0]["golden"], samples[0]["text"]
    assert src.shape == (4, 16, 16) and seq.shape == (3, 4, 16, 16) and text.shape == (32,)
    assert src.dtype == seq.dtype == text.dtype == torch.float16
    # x_T is the seed's noise; the sequence moves away from it by a few percent per step
    torch.testing.assert_close(src.float(), torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0)),
                               atol=2e-3, rtol=1e-3)
    rel = ((seq[0].float() - src.float()).norm() / src.float().norm()).item()
    assert 1e-3 < rel < 0.5
    # 🤗 datasets reads the folder (its card says where the data are) with the arrays in their shapes
    import datasets

    row = next(iter(datasets.load_dataset(str(out), split="train", streaming=True).with_format("torch")))
    assert row["id"] == 0 and row["prompt"] == samples[0]["prompt"]
    assert torch.equal(row["golden"], seq.float()) and torch.equal(row["text"], text.float())


def test_batch_size_does_not_change_samples(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 6)
    a, b = tmp_path / "b1", tmp_path / "b4"
    assert generate(capsys, tiny_pipeline_dir, pf, a, "--batch_size", 1, "--storage_dtype", "float32")[0] == 0
    assert generate(capsys, tiny_pipeline_dir, pf, b, "--batch_size", 4, "--storage_dtype", "float32")[0] == 0
    sa, sb = dataset_samples(a), dataset_samples(b)
    for i in range(6):
        # the noise depends on the seed only: bit-identical
        assert torch.equal(sa[i]["source"], sb[i]["source"])
        torch.testing.assert_close(sa[i]["golden"], sb[i]["golden"], atol=1e-5, rtol=1e-5)
        assert sa[i]["prompt"] == sb[i]["prompt"] and sa[i]["seed"] == sb[i]["seed"]


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_two_processes_give_the_same_dataset_byte_for_byte(tmp_path, tiny_pipeline_dir, capsys):
    """accelerate launch with 2 processes composes with --num_shards: run 0 of 2 on two processes (they deal its
    shards' batches and seal its shards), run 1 of 2 on one; together the dataset of one single-process run."""
    pf = prompts_file(tmp_path, 10)
    single, multi = tmp_path / "single", tmp_path / "multi"
    flags = ["--batch_size", 2, "--samples_per_shard", 4]  # shards [0, 4), [4, 8), [8, 10): runs make 0, 2 and 1
    assert generate(capsys, tiny_pipeline_dir, pf, single, *flags)[0] == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / SCRIPT),
           "--prompt_file", pf, "--output_dir", multi, "--base_model_id", tiny_pipeline_dir, "--num_steps", 3,
           "--device", "cpu", *flags, "--num_shards", 2, "--shard_index", 0]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "process 0 of 2" in proc.stdout  # really two processes, each with its own share
    assert "run 0 of 2: 2 shard(s) sealed now, 2 of 3 sealed" in proc.stdout and not (multi / "index.json").exists()
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, multi, *flags, "--num_shards", 2,
                                    "--shard_index", 1)
    assert code == 0, stderr
    assert "3 of 3 sealed, index.json written" in stdout
    assert same_tree(single, multi)


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_resume_after_kill_is_byte_identical(tmp_path, tiny_pipeline_dir, capsys):
    pf = prompts_file(tmp_path, 60)
    flags = ["--batch_size", 2, "--samples_per_shard", 6]
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    assert generate(capsys, tiny_pipeline_dir, pf, fresh, *flags)[0] == 0
    cmd, env = generate_subprocess(tiny_pipeline_dir, pf, resumed, *flags)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # killed with some shards sealed and the next one's samples half-written in staging
    while not (len(list(resumed.glob("data/shard-*.parquet"))) >= 2 and
               len(list(resumed.glob("staging/batch-*.safetensors"))) >= 2) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sealed = len(list(resumed.glob("data/shard-*.parquet")))
    assert 2 <= sealed < 10, "the run must be killed mid-way"
    assert not (resumed / "index.json").exists()
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, resumed, *flags)
    assert code == 0, stderr
    assert "already complete" in stdout and f"{10 - sealed} shard(s) sealed now" in stdout
    assert same_tree(fresh, resumed)


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_runs_on_three_machines_equal_one_run(tmp_path, tiny_pipeline_dir, capsys):
    """K = 3 separate runs (processes with no communication) into one folder, one of them killed with -9 and rerun
    alone, equal one run byte for byte; the run that seals the last shard writes the index, and --finalize says
    what is missing before that."""
    pf = prompts_file(tmp_path, 20)
    flags = ["--batch_size", 2, "--samples_per_shard", 4]  # 5 shards: tasks 0, 1, 2 make 2, 2 and 1 of them
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert generate(capsys, tiny_pipeline_dir, pf, single, *flags)[0] == 0
    procs = {}
    for i in range(3):
        cmd, env = generate_subprocess(tiny_pipeline_dir, pf, multi, *flags, "--num_shards", 3, "--shard_index", i)
        procs[i] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180  # task 1 is killed once its first shard is sealed (shard 1), mid-way
    while not (multi / "data/shard-00001.parquet").exists() and procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)
    for i in (0, 2):
        out, err = procs[i].communicate(timeout=300)
        assert procs[i].returncode == 0, err[-3000:]
    procs[1].wait()
    assert procs[1].returncode == -signal.SIGKILL
    assert not (multi / "data/shard-00004.parquet").exists() and not (multi / "index.json").exists()
    code, _, stderr = run_main(capsys, SCRIPT, "--output_dir", multi, "--finalize")
    assert code == 2 and "1 of 5 shards of" in error_line(stderr) and "(shard(s) 4)" in error_line(stderr)
    # the failed task reruns alone (Slurm's variables give it its place) and completes the dataset
    env = {**os.environ, "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "1"}
    cmd, _ = generate_subprocess(tiny_pipeline_dir, pf, multi, *flags)
    proc = subprocess.run(cmd, env={**env, "HF_HUB_OFFLINE": "1", **ONE_THREAD}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run 1 of 3" in proc.stdout and "5 of 5 sealed, index.json written" in proc.stdout
    assert same_tree(single, multi)
    code, stdout, _ = run_main(capsys, SCRIPT, "--output_dir", multi, "--finalize")
    assert code == 0 and "lists 20 samples in 5 shards" in stdout and same_tree(single, multi)


def test_task_from_flags_and_slurm():
    assert Task.resolve(None, None, {}) == Task(1, 0)
    assert Task.resolve(4, 2, {}) == Task(4, 2)
    assert Task.resolve(None, None, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "3"}) == Task(8, 3)
    # arrays numbered from 1 (--array=1-8): the index counts from the array's first id
    assert Task.resolve(None, None, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "8",
                                     "SLURM_ARRAY_TASK_MIN": "1"}) == Task(8, 7)
    assert Task.resolve(2, 1, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "3"}) == Task(2, 1)
    assert Task(3, 1).shards(8) == [1, 4, 7]
    for count, index, message in ((None, 1, "needs --num_shards"), (3, 3, r"must be in \[0, 3\)")):
        with pytest.raises(UserError, match=message):
            Task.resolve(count, index, {})


@pytest.fixture()
def finished(tmp_path, tiny_pipeline_dir, capsys):
    """A finished 5-prompt dataset (batch 2, float32 storage) and a snapshot of its files."""
    pf = prompts_file(tmp_path, 5)
    out = tmp_path / "ds"
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2, "--storage_dtype", "float32")
    assert code == 0, stderr
    return pf, out, snapshot(out)


@pytest.mark.parametrize("case", ["other_prompts", "fewer_prompts", "batch_size", "seed_and_guidance", "dtype",
                                  "sharding"])
def test_rerun_with_other_prompts_or_settings_is_refused_and_changes_nothing(case, finished, tiny_pipeline_dir,
                                                                            tmp_path, capsys, monkeypatch):
    pf, out, before = finished
    flags = ["--batch_size", 2, "--storage_dtype", "float32"]
    named = {"other_prompts": ["prompt_fingerprint"], "fewer_prompts": ["num_prompts: 5 -> 3"],
             "batch_size": ["batch_size: 2 -> 3"], "seed_and_guidance": ["denoise_guidance_scale", "start_seed"],
             "dtype": ["storage_dtype: 'float32' -> 'float16'"], "sharding": ["'samples_per_shard': 4"]}[case]
    if case == "other_prompts":  # same count and indices, other text: what the prompt fingerprint is for
        pf = prompts_file(tmp_path, 5, name="other.txt", word="circle")
    elif case == "fewer_prompts":
        flags += ["--max_prompts", 3]
    elif case == "batch_size":
        flags[1] = 3
    elif case == "seed_and_guidance":
        flags += ["--denoise_guidance_scale", 7, "--start_seed", 5]
    elif case == "sharding":
        flags += ["--samples_per_shard", 4]
    else:
        flags[3] = "float16"
    # found before the model loads, so a refused rerun costs no model load
    monkeypatch.setattr("golden_noise.dataset.generate.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, out, *flags)
    assert code == 2
    line = error_line(stderr)
    assert "holds a dataset made with other inputs or settings" in line and "--output_dir" in line
    assert all(name in line for name in named), line
    assert snapshot(out) == before  # every file untouched: same bytes, same mtime, same inode


def test_rerun_of_a_finished_dataset_changes_nothing(finished, tiny_pipeline_dir, capsys):
    pf, out, before = finished
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2, "--storage_dtype",
                                    "float32")
    assert code == 0, stderr
    assert "0 generated" in stdout and "5 already complete" in stdout and "0 shard(s) sealed now" in stdout
    assert snapshot(out) == before


def test_longer_prompt_list_extends_the_dataset_exactly(tmp_path, tiny_pipeline_dir, capsys):
    """--max_prompts 7 then 10 (batch 2, 4 samples per shard) equals a fresh 10-prompt run byte for byte: shard 0
    ([0, 4)) is kept as it is; the partial shard [4, 7) is rebuilt: samples 4 and 5 go back to staging unchanged,
    sample 6, computed in the partial batch [6, 7), is recomputed in its new batch [6, 8)."""
    pf = prompts_file(tmp_path, 10)
    flags = ["--batch_size", 2, "--storage_dtype", "float32", "--samples_per_shard", 4]
    fresh, grown = tmp_path / "fresh", tmp_path / "grown"
    assert generate(capsys, tiny_pipeline_dir, pf, fresh, *flags)[0] == 0
    assert generate(capsys, tiny_pipeline_dir, pf, grown, *flags, "--max_prompts", 7)[0] == 0
    old = snapshot(grown)
    # the point of recomputing: in the partial batch sample 6's sequence differs in the last bits
    assert not torch.equal(dataset_samples(grown)[6]["golden"], dataset_samples(fresh)[6]["golden"])
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, grown, *flags)
    assert code == 0, stderr
    assert "extends the dataset's 7 prompts to 10; 1 samples of the old last batch are recomputed" in stderr
    assert "10 complete samples" in stdout and "4 generated" in stdout and "6 already complete" in stdout
    assert same_tree(fresh, grown)
    assert snapshot(grown)["data/shard-00000.parquet"] == old["data/shard-00000.parquet"]  # untouched
    # the recorded list is now the long one: going back to the short one is refused
    code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, grown, *flags, "--max_prompts", 7)
    assert code == 2 and "num_prompts: 10 -> 7" in error_line(stderr)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def payload_offset(path: Path) -> int:
    """The file offset of the first tensor byte of a torch.save file."""
    import struct

    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    header = path.read_bytes()[info.header_offset:info.header_offset + 30]
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def foreign_pickle_zip() -> bytes:
    """A torch zip (written by torch.save itself, so its zip structure is what a tensor file's is) whose pickle
    names a callable instead of a tensor: loading it without weights_only would call code."""
    return tensor_bytes(os.getcwd)


def test_damaged_staging_files_are_regenerated_and_nothing_else_changes(tmp_path, tiny_pipeline_dir, capsys,
                                                                        monkeypatch):
    """A run killed before sealing leaves its staging files (one per global batch, safetensors with the sha256 of
    their tensors); a flipped byte, a truncated file, a foreign file (a pickle) and a missing one are found on
    resume (the checksum: every byte read), regenerated alone, and the dataset equals a fresh run's."""
    import pickle

    pf = prompts_file(tmp_path, 10)
    flags = ["--batch_size", 2, "--storage_dtype", "float32"]
    fresh, out = tmp_path / "fresh", tmp_path / "ds"
    assert generate(capsys, tiny_pipeline_dir, pf, fresh, *flags)[0] == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run died after writing every batch, before sealing

    monkeypatch.setattr("golden_noise.dataset.generate.seal_shard", killed)
    assert generate(capsys, tiny_pipeline_dir, pf, out, *flags)[0] == 130
    monkeypatch.undo()
    batches = [F.batch_path(out, b) for b in range(5)]
    assert all(p.is_file() for p in batches) and not (out / "data").exists()
    spec = SampleSpec.of(json.loads((out / F.RUN_CONFIG).read_text()))
    flip_byte(batches[1], batches[1].stat().st_size - 100)  # a tensor byte
    assert "fails its sha256 check" in read_batch(batches[1], [2, 3], spec)[1]
    batches[2].write_bytes(batches[2].read_bytes()[:500])
    batches[3].write_bytes(pickle.dumps(torch.zeros(3)))
    batches[4].unlink()
    kept = batches[0].stat().st_mtime_ns
    written = []
    import golden_noise.dataset.writer as writer_module
    real_write = writer_module.atomic_write_bytes
    monkeypatch.setattr(writer_module, "atomic_write_bytes", lambda p, data: (written.append(Path(p).name),
                                                                              real_write(p, data)))
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, out, *flags)
    assert code == 0, stderr
    assert "3 staging files are damaged" in stderr and "3 damaged files regenerated" in stdout
    assert "8 generated" in stdout and "2 already complete" in stdout
    assert sorted(written) == [p.name for p in batches[1:]]  # nothing else rewritten
    assert same_tree(fresh, out) and kept  # (batch 0's file was read when sealing, then removed with the rest)


def test_a_damaged_shard_is_found_and_remade(finished, tiny_pipeline_dir, capsys):
    pf, out, before = finished
    shard = out / "data/shard-00000.parquet"
    flip_byte(shard, shard.stat().st_size // 2)
    code, stdout, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2, "--storage_dtype",
                                    "float32")
    assert code == 0, stderr
    assert "shard-00000.parquet fails its sha256 check (a damaged byte): it is made again" in stderr
    assert "5 generated" in stdout
    assert {k: v[0] for k, v in snapshot(out).items()} == {k: v[0] for k, v in before.items()}


def test_non_finite_sequences_are_refused(tmp_path, tiny_pipeline_dir, capsys):
    """A guidance scale so large that the golden sequence overflows: one error line, nothing written."""
    out = tmp_path / "ds"
    code, _, stderr = generate(capsys, tiny_pipeline_dir, prompts_file(tmp_path, 4), out, "--batch_size", 2,
                               "--denoise_guidance_scale", 1e38)
    assert code == 2
    line = error_line(stderr)
    assert "sample 0 (2 of its batch of 2): its golden sequence holds NaN or inf values in float16" in line
    assert "nothing of the batch was written" in line and "--denoise_guidance_scale 1e+38" in line
    assert not list(out.rglob("*.pt")) and not (out / "data").exists()


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_a_second_run_into_the_same_folder_is_refused(tmp_path, tiny_pipeline_dir, capsys):
    """Stage 2 takes the run lock of stages 3 and 5 (on the shards it makes): a second run is refused while the first
    runs, changes nothing, and runs once the first is gone; another task's shards are not locked."""
    pf = prompts_file(tmp_path, 400)
    out = tmp_path / "ds"
    cmd, env = generate_subprocess(tiny_pipeline_dir, pf, out, "--batch_size", 2)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(out.glob("staging/batch-*.safetensors")) and proc.poll() is None:
            assert time.time() < deadline
            time.sleep(0.02)
        assert proc.poll() is None
        code, _, stderr = generate(capsys, tiny_pipeline_dir, pf, out, "--batch_size", 2)
        assert code == 2
        line = error_line(stderr)
        assert f"{out} is in use by a running job (pid {proc.pid}, shard 0)" in line and "--output_dir" in line
    finally:
        proc.kill()
        proc.wait()


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
    ("shard_size", "--samples_per_shard 3 must be a multiple of --batch_size 2"),
    ("task", "--shard_index 2 must be in [0, 2)"),
    ("no_prompts", "the following arguments are required: --prompt_file (unless --finalize)"),
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
    elif case == "shard_size":
        extra = ["--batch_size", 2, "--samples_per_shard", 3]
    elif case == "task":
        extra = ["--num_shards", 2, "--shard_index", 2]
    out = tmp_path / "ds"
    args = ["--output_dir", out, "--base_model_id", model, "--device", "cpu", *extra]
    code, _, stderr = run_main(capsys, SCRIPT, *([] if case == "no_prompts" else ["--prompt_file", pf]), *args)
    assert code == 2
    assert pattern in error_line(stderr)
    assert not (out / F.RUN_CONFIG).exists() and not list(out.rglob("*.pt")) and not (out / F.DATA).exists()


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
        spec = SampleSpec.of(json.loads((out / F.RUN_CONFIG).read_text()))
        files = sorted((out / F.STAGING).glob("batch-*.safetensors"))
        assert files
        for path in files:  # every visible staging file is whole
            b = int(path.stem.split("-")[1])
            assert read_batch(path, [2 * b, 2 * b + 1], spec)[1] is None
    finally:
        subprocess.run(["umount", str(mount)])


def test_tensor_file_checks_find_every_truncation_and_flipped_byte(tmp_path):
    """io.tensor_file_intact (the fast structure check): every proper prefix of a tensor file, a foreign pickle,
    an empty file and a folder fail; whole files of every size (zip64 end records included) pass.
    io.tensor_file_problem (stage 2's resume and seal check): also every flipped byte that changes what loads."""
    import io
    import pickle

    from golden_noise.io import atomic_torch_save

    for shape in [(1,), (3, 4, 16, 16), (2, 4, 128, 128)]:
        path = tmp_path / f"{len(shape)}.pt"
        atomic_torch_save(torch.randn(shape).half(), path)
        whole = path.read_bytes()
        assert tensor_file_intact(path) and tensor_file_problem(path) is None
        step = max(1, len(whole) // 500)  # about 500 prefixes, always including the last few bytes
        for n in list(range(0, len(whole), step)) + list(range(len(whole) - 120, len(whole))):
            path.write_bytes(whole[:n])
            assert not tensor_file_intact(path), (shape, n)
    t = torch.randn(4, 8, 8).half()
    whole = tensor_bytes(t)
    for i in range(len(whole)):  # every single flipped byte: caught, or harmless (padding, unused header fields)
        damaged = bytearray(whole)
        damaged[i] ^= 0x10
        if tensor_file_problem(bytes(damaged)) is None:
            try:
                loaded = torch.load(io.BytesIO(bytes(damaged)), weights_only=True)
            except Exception:
                continue  # torch refuses it (and stage 2's check loads every file after this one)
            assert torch.equal(loaded, t), i
    (tmp_path / "pickle.pt").write_bytes(pickle.dumps(torch.zeros(3)))
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder.pt").mkdir()
    for bad in ("pickle.pt", "empty.pt", "missing.pt", "folder.pt"):
        assert not tensor_file_intact(tmp_path / bad) and tensor_file_problem(tmp_path / bad)


def test_flags_are_generated_from_the_dataclasses(capsys):
    """Every stage-2 flag comes from a dataclass field (or the shared pipeline flags) with its default; the
    rerun keys come from the fields' metadata."""
    cli = load_cli(SCRIPT)
    args = cli.parse_args(["--prompt_file", "p.txt"])
    settings, defaults = cli.dataclass_from_args(GenerationSettings, args), GenerationSettings()
    for name in ("start_seed", "storage_dtype", "save_prompt_embeds", "text_embedding", "height", "width",
                 "num_steps", "batch_size", "samples_per_shard"):
        assert getattr(settings, name) == getattr(defaults, name), name
    assert (args.output_dir, args.max_prompts, args.num_shards, args.shard_index, args.finalize) == \
        ("./data/npd_sequence_dataset_sdxl/", None, None, None, False)
    assert {"golden", "num_steps", "batch_size", "start_seed", "storage_dtype", "scoring"} <= set(EARLY_KEYS)
    assert {"height", "width", "text_embedding", "latent_shape", "sharding"} <= set(SIGNATURE_KEYS) - set(EARLY_KEYS)
    # a field's rules are its flag's: one line naming the flag
    for argv, message in ((["--num_steps", "0"], "--num_steps must be at least 1, got 0"),
                          (["--denoise_guidance_scale", "nan"], "--denoise_guidance_scale"),
                          (["--start_seed", str(2 ** 63)], "--start_seed must be in [0, 9223372036854775807]"),
                          (["--shard_index", "-1"], "--shard_index must not be negative, got -1"),
                          (["--samples_per_shard", "0"], "--samples_per_shard must be at least 1, got 0")):
        with pytest.raises(SystemExit):
            cli.parse_args(["--prompt_file", "p.txt", *argv])
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_stage_2_imports_nothing_of_stages_5_and_6():
    """Pipeline order: stage 2 (its CLI, the generator, scoring with its reward plumbing) and the dataset package
    import no module of stage 5 (inference) or 6 (evaluation, report, sweep)."""
    code = ("import sys, runpy; sys.argv = ['x', '--help']\n"
            "import golden_noise.dataset.generate, golden_noise.dataset.convert, golden_noise.dataset.hub\n"
            "import golden_noise.scoring, golden_noise.rewards.base, golden_noise.training.trainer\n"
            "try:\n    runpy.run_path('src/generate_npd_series.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('golden_noise'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(ROOT), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = proc.stdout.strip().splitlines()[-1].split()
    assert "golden_noise.dataset.generate" in loaded and "golden_noise.scoring" in loaded
    later = [m for m in loaded if m.split(".")[1:2] in (["inference"], ["evaluation"], ["report"], ["sweep"])]
    assert later == [], later
