"""Stage 3: the sequence dataset reader and train_rnn_model_v3.py on real stage-2 data from the tiny pipeline.

Training runs use a tiny architecture (~20k parameters) and one intra-op thread per process (two cores are
shared by everything on the test machine, and oversubscribed OpenMP threads make small ops ~20x slower).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from golden_noise.errors import UserError
from golden_noise.sequence_data import collate, golden_change_rms, open_dataset, split_ids
from golden_noise.model.rnn_seq_model_v3 import FINAL_STEM, NoiseSequenceRNN_v3
from tests.conftest import ROOT, run_cli

TRAIN = "src/train_rnn_model_v3.py"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY_ARCH = ["--cnn_base_filters", 8, "--cnn_num_blocks", 1, 1, "--cnn_feat_dim", 32, "--gru_hidden_size", 32,
             "--gru_num_layers", 1, "--text_proj_dim", 32, "--norm_groups", 8, "--dataloader_num_workers", 0]
WORDS = ("cat dog house tree red blue green sunset portrait city ocean mountain robot flower car bird painting "
         "photo of a the in with old neon snowy").split()


def train(*args, env=None, check=True):
    return run_cli(TRAIN, *TINY_ARCH, *args, env={**ENV, **(env or {})}, check=check)


def write_synthetic_dataset(root: Path, n: int = 8, steps: int = 3, shape=(4, 8, 8), dim: int = 16,
                            dtype=torch.float32) -> Path:
    """A dataset in stage 2's layout with random tensors (a small smooth change per step), for bad-input tests."""
    g = torch.Generator().manual_seed(0)
    (root / "sequences").mkdir(parents=True)
    rows = []
    for i in range(n):
        x = torch.randn(shape, generator=g)
        seq, cur = [], x
        for _ in range(steps):
            cur = 0.97 * cur + 0.05 * torch.tanh(cur.roll(1, dims=-1))
            seq.append(cur)
        files = {"source_noise_file": f"sequences/{i}_source.pt",
                 "golden_sequence_file": f"sequences/{i}_golden_sequence.pt",
                 "text_embedding_file": f"sequences/{i}_text.pt"}
        torch.save(x.to(dtype), root / files["source_noise_file"])
        torch.save(torch.stack(seq).to(dtype), root / files["golden_sequence_file"])
        torch.save(torch.randn(dim, generator=g).to(dtype), root / files["text_embedding_file"])
        rows.append({"id": i, "prompt": f"prompt {i}", "seed": i, "num_steps": steps, **files})
    with open(root / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "run_config.json").write_text(json.dumps({
        "format_version": 1, "base_model_id": "synthetic", "num_steps": steps, "latent_shape": list(shape),
        "storage_dtype": str(dtype).replace("torch.", ""), "text_embedding": {"kind": "pooled", "dim": dim}}))
    return root


@pytest.fixture(scope="session")
def npd_dataset(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """64 real golden sequences (n = 4, latents 4x16x16, float16 storage) from stage 2 on the tiny pipeline."""
    root = tmp_path_factory.mktemp("npd")
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (3 + i % 6,), generator=g)) for i in range(64)]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run_cli("src/generate_npd_series.py", "--prompt_file", root / "prompts.txt", "--output_dir", root / "ds",
            "--base_model_id", tiny_pipeline_dir, "--num_steps", 4, "--batch_size", 16, "--device", "cpu",
            "--dtype", "float32", env={**ENV, "OMP_NUM_THREADS": "2"}, check=True)
    return root / "ds"


def free_port() -> int:
    """A free TCP port for the process group (others may run accelerate's default 29500 at the same time)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---- dataset reader ------------------------------------------------------------------------------------------

def test_dataset_reads_splits_and_truncates(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n=10, steps=3, dtype=torch.float16)
    data = open_dataset(root, validation_fraction=0.2)
    assert (len(data.train), len(data.validation)) == (8, 2)
    assert sorted(data.train.ids + data.validation.ids) == list(range(10))
    s = data.train[0]
    assert s["source"].shape == (4, 8, 8) and s["golden"].shape == (3, 4, 8, 8) and s["text"].shape == (16,)
    assert s["source"].dtype == torch.float32 and s["valid"]
    batch = collate([data.train[i] for i in range(4)])
    assert batch["golden"].shape == (4, 3, 4, 8, 8) and batch["valid"].all() and batch["errors"] == []
    assert open_dataset(root, 0.2, max_seq_len=2).train[0]["golden"].shape == (2, 4, 8, 8)
    assert 0.01 < golden_change_rms(data.train) < 0.2
    # the split depends on the ids only: not on their order, and a fraction of 0 keeps everything for training
    train, val = split_ids(list(range(100)), 0.1)
    assert (len(train), len(val)) == (90, 10) and sorted(split_ids(list(reversed(range(100))), 0.1)[1]) == val
    assert split_ids([3, 7], 0.0) == ([3, 7], [])


def test_dataset_bad_inputs_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    root = write_synthetic_dataset(tmp_path / "ds", n=6)
    (root / "run_config.json").rename(root / "rc.json")
    with pytest.raises(UserError, match="missing .*run_config.json"):
        open_dataset(root)
    (root / "rc.json").rename(root / "run_config.json")

    (root / "sequences/2_text.pt").unlink()
    with pytest.raises(UserError, match=r"missing file .*2_text\.pt"):
        open_dataset(root)
    data = open_dataset(root, 0.0, skip_bad_samples=True)
    assert len(data.train) == 5 and data.missing == [str(root / "sequences/2_text.pt")]

    (root / "sequences/4_golden_sequence.pt").write_bytes(b"\x00garbage")
    data = open_dataset(root, 0.0, skip_bad_samples=True, return_errors=True)
    bad = data.train.ids.index(4)
    assert not data.train[bad]["valid"] and "4_golden_sequence.pt" in data.train[bad]["error"]
    batch = collate([data.train[i] for i in range(len(data.train))])
    assert batch["bad_ids"] == [4] and batch["valid"].sum() == 4 and batch["golden"][bad].abs().sum() == 0
    with pytest.raises(UserError, match="4_golden_sequence.pt"):
        golden_change_rms(data.train)
    assert golden_change_rms(data.train, skip_bad_samples=True) > 0
    data.train.return_errors = False
    with pytest.raises(UserError, match=r"cannot read tensor file .*4_golden_sequence\.pt"):
        data.train[bad]

    torch.save(torch.zeros(3, 4, 8, 9), root / "sequences/4_golden_sequence.pt")
    with pytest.raises(UserError, match=r"4_golden_sequence\.pt has shape \(3, 4, 8, 9\), expected \(3, 4, 8, 8\)"):
        data.train[bad]
    torch.save(torch.full((3, 4, 8, 8), float("nan")), root / "sequences/4_golden_sequence.pt")
    with pytest.raises(UserError, match="NaN"):
        data.train[bad]

    text = (root / "metadata.csv").read_text().replace("\n1,prompt 1,1,3,", "\n1,prompt 1,1,5,")
    (root / "metadata.csv").write_text(text)
    with pytest.raises(UserError, match="line 3: sample 1 has num_steps 5"):
        open_dataset(root, skip_bad_samples=True)


# ---- training CLI --------------------------------------------------------------------------------------------

def test_cli_contradicting_flags_and_skip_bad_samples(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    out = tmp_path / "out"
    proc = train("--dataset_dir", root, "--output_dir", out, "--text_embed_dim", 1280, check=False)
    assert proc.returncode == 2
    assert "--text_embed_dim 1280 contradicts the dataset's text_embedding.dim 16" in proc.stderr
    proc = train("--dataset_dir", root, "--output_dir", out, "--noise_resolution", 128, check=False)
    assert proc.returncode == 2 and "--noise_resolution 128 contradicts the dataset's latent_shape" in proc.stderr

    (root / "sequences/5_source.pt").write_bytes(b"not a tensor")
    proc = train("--dataset_dir", root, "--output_dir", out, "--max_train_steps", 3, "--batch_size", 8,
                 "--validation_fraction", 0, "--report_to", "none", check=False)
    assert proc.returncode == 2 and "5_source.pt" in proc.stderr.strip().splitlines()[-1]
    assert not (out / f"{FINAL_STEM}.safetensors").exists()
    train("--dataset_dir", root, "--output_dir", out, "--max_train_steps", 3, "--batch_size", 8,
          "--validation_fraction", 0, "--report_to", "none", "--skip_bad_samples", "--noise_resolution", 8,
          "--text_embed_dim", 16)
    summary = json.loads((out / "validation.json").read_text())
    assert summary["skipped_bad_samples"] == 1 and summary["global_step"] == 3  # one bad sample, seen 3 times


def test_bad_data_mid_run_stops_with_last_checkpoint_intact(tmp_path):
    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    out = tmp_path / "out"
    common = ["--dataset_dir", root, "--output_dir", out, "--batch_size", 8, "--validation_fraction", 0,
              "--save_steps", 2, "--report_to", "none"]
    train(*common, "--max_train_steps", 2)
    ckpt = out / "checkpoint-2"
    before = {p.name: sha(p) for p in ckpt.iterdir()}
    export = sha(out / f"{FINAL_STEM}.safetensors")
    # a corrupt file read by a loader worker: one clean line naming it (a resumed run reads the data only in the loop)
    good = (root / "sequences/3_golden_sequence.pt").read_bytes()
    (root / "sequences/3_golden_sequence.pt").write_bytes(good[: len(good) // 2])
    proc = train(*common, "--max_train_steps", 6, "--resume_from_checkpoint", "latest", "--dataloader_num_workers", 1,
                 check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read tensor file ")
    assert "3_golden_sequence.pt" in proc.stderr.strip().splitlines()[-1]
    # finite data whose squared error overflows float32: the loss becomes inf/NaN
    torch.save(torch.full((3, 4, 8, 8), 1e30), root / "sequences/3_golden_sequence.pt")
    proc = train(*common, "--max_train_steps", 6, "--resume_from_checkpoint", "latest", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss") and "at step 3" in last and "checkpoint-2 is intact" in last
    assert {p.name: sha(p) for p in ckpt.iterdir()} == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert sha(out / f"{FINAL_STEM}.safetensors") == export


def test_training_beats_identity_baseline_on_held_out_samples(npd_dataset, tmp_path):
    """A few hundred steps on real golden sequences must explain part of the golden change on held-out ids;
    an identity model (the untrained one) scores exactly 0 here, and the test demands more."""
    out = tmp_path / "run"
    proc = train("--dataset_dir", npd_dataset, "--output_dir", out, "--max_train_steps", 250, "--batch_size", 8,
                 "--learning_rate", 2e-3, "--dropout", 0, "--validation_fraction", 0.25, "--validation_steps", 0,
                 "--save_steps", 1000, "--logging_steps", 50)
    summary = json.loads((out / "validation.json").read_text())
    report = summary["validation"]
    assert report["num_samples"] == 16 and report["num_steps"] == 4 and summary["num_processes"] == 1
    assert set(summary["validation_ids"]).isdisjoint(open_dataset(npd_dataset, 0.25).train.ids)
    assert report["final_step"]["explained_fraction"] > 0.05, proc.stdout
    assert report["teacher_forcing"]["explained_fraction"] > 0.05
    assert all(s["model_mse"] < s["baseline_mse"] for s in report["teacher_forcing"]["per_step"])
    assert "explains" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags.update(acc.Tags()["scalars"])
    assert {"train/loss", "train/mse", "train/kl", "train/lr", "train/grad_norm", "train/samples_per_s",
            "val/rollout_final_explained", "val/teacher_forcing_explained"} <= tags

    model, meta = NoiseSequenceRNN_v3.from_pretrained(out)
    assert meta["run_config"]["latent_shape"] == [4, 16, 16] and meta["training"]["global_step"] == 250
    assert meta["training"]["validation"]["final_step"] == report["final_step"]
    data = open_dataset(npd_dataset, 0.25)
    batch = collate([data.validation[i] for i in range(len(data.validation))])
    seq = model.generate_sequence(batch["source"], batch["text"], 4)
    err = (seq[:, -1] - batch["golden"][:, -1]).pow(2).mean().item()
    assert err == pytest.approx(report["final_step"]["model_mse"], rel=1e-4)


def test_resume_continues_exactly(npd_dataset, tmp_path):
    """Run to step 8 (checkpoints at 3 and 6), then restart a copy from checkpoint-3 (mid-epoch, with dropout,
    variance and KL): the resumed run must end with the same weights."""
    args = ["--dataset_dir", npd_dataset, "--max_train_steps", 8, "--batch_size", 4, "--gradient_accumulation_steps",
            2, "--validation_fraction", 0.25, "--save_steps", 3, "--max_checkpoints", 0, "--predict_variance",
            "--kl_weight", 0.01, "--dropout", 0.2, "--learning_rate", 1e-3, "--report_to", "none",
            "--validation_steps", 0]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(*args, "--output_dir", full)
    assert sorted(p.name for p in full.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    state = json.loads((full / "checkpoint-3/training_state.json").read_text())
    assert state["global_step"] == 3 and state["epoch"] == 0  # 48 samples / (4 x 2) = 6 steps per epoch
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    proc = train(*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in proc.stderr and "skipping 6 batches" in proc.stderr
    a, _ = NoiseSequenceRNN_v3.from_pretrained(full)
    b, _ = NoiseSequenceRNN_v3.from_pretrained(resumed)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")
    assert not torch.equal(a.mean_head.weight, torch.zeros_like(a.mean_head.weight))
    # a changed architecture cannot resume that checkpoint
    proc = train(*args, "--output_dir", resumed, "--resume_from_checkpoint", resumed / "checkpoint-3",
                 "--gru_hidden_size", 48, check=False)
    assert proc.returncode == 2 and "--gru_hidden_size 48 (checkpoint: 32)" in proc.stderr


def test_resume_from_the_final_checkpoint_only_exports(npd_dataset, tmp_path):
    """Resuming a run whose last checkpoint is its final step trains nothing and exports the same weights."""
    args = ["--dataset_dir", npd_dataset, "--output_dir", tmp_path, "--max_train_steps", 6, "--batch_size", 4,
            "--gradient_accumulation_steps", 2, "--validation_fraction", 0.25, "--save_steps", 6,
            "--report_to", "none"]
    train(*args)
    first, _ = NoiseSequenceRNN_v3.from_pretrained(tmp_path)
    proc = train(*args, "--resume_from_checkpoint", "latest")
    assert "Resumed from" in proc.stderr and "step 6, epoch 1" in proc.stderr
    again, meta = NoiseSequenceRNN_v3.from_pretrained(tmp_path)
    assert meta["training"]["global_step"] == 6
    for pa, pb in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(pa, pb)


def test_seed_command_flags_and_two_processes(npd_dataset, tmp_path):
    """The seed's command line (sizes scaled down), launched by accelerate with 2 CPU processes (gloo)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / TRAIN),
           "--dataset_dir", str(npd_dataset), "--output_dir", str(out), "--noise_resolution", "16",
           "--text_embed_dim", "32", "--base_model_id", "stabilityai/stable-diffusion-xl-base-1.0",
           "--npnet_model_id", "Lykon/dreamshaper-xl-v2-turbo", "--predict_variance", "--kl_weight", "0.01",
           "--num_epochs", "2", "--batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-4",
           "--mixed_precision", "fp16", "--save_steps", "1", "--max_checkpoints", "3", "--validation_fraction", "0.25",
           *map(str, TINY_ARCH)]
    env = {**os.environ, **ENV, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "num_processes=2" in proc.stderr
    summary = json.loads((out / "validation.json").read_text())
    # 48 training samples, 4 per process, 2 processes, 2 micro-batches per step: 3 steps per epoch, 2 epochs
    assert summary["num_processes"] == 2 and summary["global_step"] == 6
    assert summary["validation"]["num_samples"] == 16  # gathered across processes without duplicates
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert (out / "checkpoint-6/random_states_1.pkl").is_file()
    _, meta = NoiseSequenceRNN_v3.from_pretrained(out / f"{FINAL_STEM}.json")
    assert meta["model_config"]["predict_variance"] and meta["training"]["args"]["kl_weight"] == 0.01
