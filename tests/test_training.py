"""Stage 3: the sequence dataset reader, the Trainer and train_rnn_model_v3.py on real stage-2 data from the tiny
pipeline (and on small synthetic datasets of loose files, format 1: golden_noise.dataset.format).

Most runs call the CLI's main() in this process (the Trainer does the work); subprocesses only where a process
matters: kill -9, a second process holding the output dir, accelerate launch with 2 processes, scripts/train.sh.
Training runs use a tiny architecture (~20k parameters) and one intra-op thread per process (two cores are
shared by everything on the test machine, and oversubscribed OpenMP threads make small ops ~20x slower).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from golden_noise.dataset import format as F
from golden_noise.errors import UserError
from golden_noise.model.rnn_seq_model_v3 import FINAL_STEM, NoiseSequenceRNN_v3, NoiseSequenceRNNConfig
from golden_noise.runtime import run_cli as cli_main
from golden_noise.dataset.reader import collate, golden_change_rms, open_dataset, split_ids
from golden_noise.training.config import ARCH_FIELDS, TrainingConfig
from golden_noise.training.core import warmup_cosine
import golden_noise_toy.student
import golden_noise_toy.training
from tests.conftest import ROOT, run_cli

TRAIN = "src/train_rnn_model_v3.py"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ARCH = ["--cnn_base_filters", 8, "--cnn_num_blocks", 1, 1, "--cnn_feat_dim", 32, "--gru_hidden_size", 32,
        "--gru_num_layers", 1, "--text_proj_dim", 32, "--norm_groups", 8]
TINY_ARCH = [*ARCH, "--dataloader_num_workers", 0]
WORDS = ("cat dog house tree red blue green sunset portrait city ocean mountain robot flower car bird painting "
         "photo of a the in with old neon snowy").split()

_spec = importlib.util.spec_from_file_location("train_rnn_model_v3", ROOT / TRAIN)
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)


@pytest.fixture(autouse=True)
def fresh_process_state():
    """Each in-process run starts as a fresh process would: no accelerate state, no logging handlers."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        for handler in logging.getLogger().handlers[:]:
            logging.getLogger().removeHandler(handler)

    reset()
    yield
    reset()


def train(*args, arch=TINY_ARCH) -> dict:
    """train_rnn_model_v3.py's main() in this process; returns the validation.json summary."""
    return train_cli.main(train_cli.parse_args([str(a) for a in (*arch, *args)]))


def train_error(capsys, *args, arch=TINY_ARCH) -> str:
    """Run the CLI in this process, expecting the one-line error (exit 2); returns that line."""
    capsys.readouterr()
    assert cli_main(train_cli.main, train_cli.parse_args, [str(a) for a in (*arch, *args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def train_subprocess(*args, env=None, check=True):
    return run_cli(TRAIN, *TINY_ARCH, *args, env={**ENV, **(env or {})}, check=check)


def write_synthetic_dataset(root: Path, n: int = 8, steps: int = 3, shape=(4, 8, 8), dim: int = 16,
                            dtype=torch.float32) -> Path:
    """A format-1 dataset (loose files: golden_noise.dataset.format) with random tensors (a small smooth change per
    step)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        x = torch.randn(shape, generator=g)
        seq, cur = [], x
        for _ in range(steps):
            cur = 0.97 * cur + 0.05 * torch.tanh(cur.roll(1, dims=-1))
            seq.append(cur)
        F.write_loose_sample(root, i, {"source_noise_file": x.to(dtype),
                                      "golden_sequence_file": torch.stack(seq).to(dtype),
                                      "text_embedding_file": torch.randn(dim, generator=g).to(dtype)})
        rows.append({"id": i, "prompt": f"prompt {i}", "seed": i, "num_steps": steps})
    F.write_metadata(root, rows)
    F.write_run_config(root, {
        "format_version": F.LOOSE_FORMAT_VERSION, "base_model_id": "synthetic", "num_steps": steps,
        "latent_shape": list(shape), "storage_dtype": str(dtype).replace("torch.", ""),
        "text_embedding": {"kind": "pooled", "dim": dim}})
    return root


def sample_file(root: Path, sample_id: int, column: str) -> Path:
    return root / F.sample_files(sample_id)[column]


@pytest.fixture(scope="session")
def npd_dataset(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """64 real golden sequences (n = 4, latents 4x16x16, float16 storage) from stage 2 on the tiny pipeline."""
    root = tmp_path_factory.mktemp("npd")
    g = torch.Generator().manual_seed(0)
    prompts = [" ".join(WORDS[j] for j in torch.randint(len(WORDS), (3 + i % 6,), generator=g)) for i in range(64)]
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    run_cli("src/generate_npd_series.py", "--prompt_file", root / "prompts.txt", "--output_dir", root / "ds",
            "--base_model_id", tiny_pipeline_dir, "--num_steps", 4, "--batch_size", 16, "--device", "cpu",
            "--dtype", "float32", env=ENV, check=True)
    return root / "ds"


def free_port() -> int:
    """A free TCP port for the process group (others may run accelerate's default 29500 at the same time)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def export_tensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / f"{FINAL_STEM}.safetensors"))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item():.3g}"


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
    train_ids, val = split_ids(list(range(100)), 0.1)
    assert (len(train_ids), len(val)) == (90, 10) and sorted(split_ids(list(reversed(range(100))), 0.1)[1]) == val
    assert split_ids([3, 7], 0.0) == ([3, 7], [])


def test_dataset_bad_inputs_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    root = write_synthetic_dataset(tmp_path / "ds", n=6)
    (root / "run_config.json").rename(root / "rc.json")
    with pytest.raises(UserError, match="missing .*run_config.json"):
        open_dataset(root)
    (root / "rc.json").rename(root / "run_config.json")

    sample_file(root, 2, "text_embedding_file").unlink()
    with pytest.raises(UserError, match=r"missing file .*2_text\.pt"):
        open_dataset(root)
    data = open_dataset(root, 0.0, skip_bad_samples=True)
    assert len(data.train) == 5 and data.missing == [str(sample_file(root, 2, "text_embedding_file"))]

    # a file that passes the quick check (a complete torch file, large enough) but holds the wrong tensor: found
    # when loaded, and with return_errors the sample comes back invalid and zero-filled, batch shapes unchanged
    golden = sample_file(root, 4, "golden_sequence_file")
    torch.save(torch.zeros(3, 4, 8, 9), golden)
    data = open_dataset(root, 0.0, skip_bad_samples=True, return_errors=True)
    bad = data.train.ids.index(4)
    assert not data.train[bad]["valid"] and "has shape (3, 4, 8, 9), expected (3, 4, 8, 8)" in data.train[bad]["error"]
    batch = collate([data.train[i] for i in range(len(data.train))])
    assert batch["bad_ids"] == [4] and batch["valid"].sum() == 4 and batch["golden"][bad].abs().sum() == 0
    with pytest.raises(UserError, match="4_golden_sequence.pt"):
        golden_change_rms(data.train)
    assert golden_change_rms(data.train, skip_bad_samples=True) > 0
    data.train.return_errors = False
    torch.save(torch.full((3, 4, 8, 8), float("nan")), golden)
    with pytest.raises(UserError, match="NaN"):
        data.train[bad]

    text = (root / "metadata.csv").read_text().replace("\n1,prompt 1,1,3,", "\n1,prompt 1,1,5,")
    (root / "metadata.csv").write_text(text)
    with pytest.raises(UserError, match="line 3: sample 1 has num_steps 5"):
        open_dataset(root, skip_bad_samples=True)


def test_every_file_is_verified_before_training(tmp_path):
    """Truncated, too small or non-tensor files anywhere (the validation split included) are reported by name
    before any work; --skip_bad_samples drops and counts them."""
    root = write_synthetic_dataset(tmp_path / "ds", n=10, dtype=torch.float16)
    val_id = open_dataset(root, 0.2).validation.ids[0]
    target = sample_file(root, val_id, "golden_sequence_file")
    good = target.read_bytes()
    target.write_bytes(good[: len(good) - 40])  # truncated: the zip directory at the end is gone
    with pytest.raises(UserError, match=rf"{target.name} is not a complete torch tensor file .*truncated") as e:
        open_dataset(root, 0.2)
    assert "\n" not in str(e.value) and "--skip_bad_samples" in str(e.value)
    data = open_dataset(root, 0.2, skip_bad_samples=True)
    assert val_id not in data.train.ids + data.validation.ids and data.damaged == [str(target)]
    assert data.dropped_ids == [val_id] and data.missing == []

    torch.save(torch.zeros(2, 4, 8, 8, dtype=torch.float16), target)  # complete, but two steps instead of three
    with pytest.raises(UserError, match=rf"{target.name} holds 1024 bytes of tensor data, fewer than .* 1536"):
        open_dataset(root, 0.2)
    target.write_bytes(b"x" * 4000)  # large enough, but not a torch file
    with pytest.raises(UserError, match=rf"{target.name} is not a complete torch tensor file"):
        open_dataset(root, 0.2)


def test_training_stops_before_the_first_step_on_a_truncated_validation_file(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "ds", n=10)
    val_id = open_dataset(root, 0.2).validation.ids[0]
    target = sample_file(root, val_id, "text_embedding_file")
    target.write_bytes(target.read_bytes()[:100])
    out = tmp_path / "out"
    common = ["--dataset_dir", root, "--output_dir", out, "--max_train_steps", 2, "--batch_size", 4,
              "--validation_fraction", 0.2, "--report_to", "none"]
    line = train_error(capsys, *common)
    assert target.name in line and "truncated" in line
    assert not list(out.glob("checkpoint-*")) and not (out / f"{FINAL_STEM}.safetensors").exists()
    summary = train(*common, "--skip_bad_samples")
    assert summary["skipped_bad_samples"] == 1 and summary["damaged_files"] == 1
    assert summary["train_samples"] + summary["validation_samples"] == 9 and val_id not in summary["validation_ids"]


# ---- flags ---------------------------------------------------------------------------------------------------

def test_flags_are_generated_from_the_dataclasses():
    """Every TrainingConfig field and every architecture field is a flag with its dataclass default and help;
    list flags take the seed's `2 2 2 2` and the older `2,2,2,2`."""
    args = train_cli.parse_args([])
    config, arch = TrainingConfig(), NoiseSequenceRNNConfig()
    for name in vars(config):
        assert getattr(args, name) == getattr(config, name), name
    for name in ARCH_FIELDS:
        assert getattr(args, name) == getattr(arch, name) == getattr(args.arch, name), name
    assert args.mixed_precision is None and args.dataloader_num_workers == 2 and args.cnn_num_blocks == [2, 2, 2, 2]
    assert train_cli.parse_args(["--cnn_num_blocks", "2,2,2,2"]).cnn_num_blocks == [2, 2, 2, 2]
    assert train_cli.parse_args(["--cnn_num_blocks", "3", "1"]).arch.cnn_num_blocks == [3, 1]
    buf = io.StringIO()
    with pytest.raises(SystemExit), pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        train_cli.parse_args(["--help"])
    help_text = buf.getvalue()
    for name in [*vars(config), *ARCH_FIELDS]:
        assert f"--{name}" in help_text, name
    assert all(entry.count("(default") <= 1 for entry in re.split(r"\n  --", help_text))  # never doubled
    flat = " ".join(help_text.split())
    assert "(default: None)" not in flat and "(default: 5% of the steps" in flat
    assert "(default: 2 2 2 2)" in flat and "(default: 0.1)" in flat


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["--cnn_num_blocks", "2", "0"], "cnn_num_blocks must be a non-empty list of positive ints"),
    (["--mixed_precision", "fp8"], "invalid choice: 'fp8'"),
    (["--resume_fallback"], "--resume_fallback needs --resume_from_checkpoint latest"),
    (["--max_grad_norm", "nan"], "--max_grad_norm: must be a finite number, got nan"),
    (["--weight_decay", "nan"], "--weight_decay: must be a finite number, got nan"),
    (["--adam_beta1", "1.5"], "--adam_beta1 must be in [0, 1), got 1.5"),
    (["--adam_beta2", "nan"], "--adam_beta2: must be a finite number, got nan"),
    (["--seed", "-1"], "--seed must be in [0, 2147483647], got -1"),
    (["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
    (["--validation_fraction", "1"], "--validation_fraction must be in [0, 1), got 1.0"),
    (["--dropout", "inf"], "--dropout: must be a finite number, got inf"),
])
def test_bad_flags_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_cli.parse_args(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_one_warmup_cosine_rule():
    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5) and warmup_cosine(20, 4, 20) == 0.0
    assert warmup_cosine(12, 4, 20, min_lr_ratio=0.1) == pytest.approx(0.55)
    # the toy world's builder calls the core's rule itself (no second schedule with its own argument order)
    for module in (golden_noise_toy.training, golden_noise_toy.student):
        assert module.warmup_cosine is warmup_cosine and not hasattr(module, "cosine_lr")


# ---- training ------------------------------------------------------------------------------------------------

def test_cli_contradicting_flags_and_skip_bad_samples(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    out = tmp_path / "out"
    line = train_error(capsys, "--dataset_dir", root, "--output_dir", out, "--text_embed_dim", 1280)
    assert "--text_embed_dim 1280 contradicts the dataset's text_embedding.dim 16" in line
    line = train_error(capsys, "--dataset_dir", root, "--output_dir", out, "--noise_resolution", 128)
    assert "--noise_resolution 128 contradicts the dataset's latent_shape" in line
    (tmp_path / "file").write_text("")
    line = train_error(capsys, "--dataset_dir", root, "--output_dir", tmp_path / "file" / "out")
    assert f"--output_dir {tmp_path / 'file' / 'out'} is not a writable folder" in line

    sample_file(root, 5, "source_noise_file").write_bytes(b"not a tensor")
    common = ["--dataset_dir", root, "--output_dir", out, "--max_train_steps", 3, "--batch_size", 8,
              "--validation_fraction", 0, "--report_to", "none"]
    assert "5_source.pt" in train_error(capsys, *common)
    assert not (out / f"{FINAL_STEM}.safetensors").exists()
    summary = train(*common, "--skip_bad_samples", "--noise_resolution", 8, "--text_embed_dim", 16)
    assert summary["skipped_bad_samples"] == 1 and summary["global_step"] == 3 and summary["train_samples"] == 7
    assert json.loads((out / "validation.json").read_text())["skipped_bad_samples"] == 1


def test_bad_data_mid_run_stops_with_last_checkpoint_intact(tmp_path, capsys):
    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    out = tmp_path / "out"
    common = ["--dataset_dir", root, "--output_dir", out, "--batch_size", 8, "--validation_fraction", 0,
              "--save_steps", 2, "--report_to", "none"]
    train(*common, "--max_train_steps", 2)
    ckpt = out / "checkpoint-2"
    before = tree_hashes(ckpt)
    export = sha(out / f"{FINAL_STEM}.safetensors")
    # a file that passes the quick check but whose values are bad, read by a loader worker: one clean line
    golden = sample_file(root, 3, "golden_sequence_file")
    torch.save(torch.full((3, 4, 8, 8), float("inf")), golden)
    line = train_error(capsys, *common, "--max_train_steps", 6, "--resume_from_checkpoint", "latest",
                       "--dataloader_num_workers", 1, arch=ARCH)
    assert "3_golden_sequence.pt contains NaN or inf values" in line
    # finite data whose squared error overflows float32: the loss becomes inf/NaN
    torch.save(torch.full((3, 4, 8, 8), 1e30), golden)
    line = train_error(capsys, *common, "--max_train_steps", 6, "--resume_from_checkpoint", "latest")
    assert line.startswith("error: non-finite loss") and "at step 3" in line and "checkpoint-2 is intact" in line
    assert tree_hashes(ckpt) == before
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert sha(out / f"{FINAL_STEM}.safetensors") == export


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_training_beats_identity_baseline_on_held_out_samples(npd_dataset, tmp_path, capsys):
    """A few hundred steps on real golden sequences must explain part of the golden change on held-out ids;
    an identity model (the untrained one) scores exactly 0 here, and the test demands more."""
    out = tmp_path / "run"
    summary = train("--dataset_dir", npd_dataset, "--output_dir", out, "--max_train_steps", 250, "--batch_size", 8,
                    "--learning_rate", 2e-3, "--dropout", 0, "--validation_fraction", 0.25, "--validation_steps", 0,
                    "--save_steps", 1000, "--logging_steps", 50)
    stdout = capsys.readouterr().out
    assert summary == json.loads((out / "validation.json").read_text())
    report = summary["validation"]
    assert report["num_samples"] == 16 and report["num_steps"] == 4 and summary["num_processes"] == 1
    assert set(summary["validation_ids"]).isdisjoint(open_dataset(npd_dataset, 0.25).train.ids)
    assert report["final_step"]["explained_fraction"] > 0.05, stdout
    assert report["teacher_forcing"]["explained_fraction"] > 0.05
    assert all(s["model_mse"] < s["baseline_mse"] for s in report["teacher_forcing"]["per_step"])
    assert "explains" in stdout and "\r" not in stdout
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


def test_resume_continues_exactly(npd_dataset, tmp_path, capsys):
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
    assert state["args"]["gru_hidden_size"] == 32 and state["args"]["kl_weight"] == 0.01
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    capsys.readouterr()
    train(*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest")
    err = capsys.readouterr().err
    assert "Resumed from" in err and "skipping 6 batches" in err
    a, b = export_tensors(full), export_tensors(resumed)
    assert_same_tensors(a, b)
    assert not torch.equal(a["mean_head.weight"], torch.zeros_like(a["mean_head.weight"]))
    # a changed architecture cannot resume that checkpoint
    line = train_error(capsys, *args, "--output_dir", resumed, "--resume_from_checkpoint", resumed / "checkpoint-3",
                       "--gru_hidden_size", 48)
    assert "gru_hidden_size: 32 -> 48" in line


def test_resume_from_the_final_checkpoint_only_exports(npd_dataset, tmp_path, capsys):
    """Resuming a run whose last checkpoint is its final step trains nothing and exports the same weights."""
    args = ["--dataset_dir", npd_dataset, "--output_dir", tmp_path, "--max_train_steps", 6, "--batch_size", 4,
            "--gradient_accumulation_steps", 2, "--validation_fraction", 0.25, "--save_steps", 6,
            "--report_to", "none"]
    train(*args)
    first = export_tensors(tmp_path)
    capsys.readouterr()
    summary = train(*args, "--resume_from_checkpoint", "latest")
    err = capsys.readouterr().err
    assert "Resumed from" in err and "step 6, epoch 1" in err and summary["global_step"] == 6
    assert_same_tensors(first, export_tensors(tmp_path))


TINY = dict(cnn_base_filters=8, cnn_num_blocks=[1, 1], cnn_feat_dim=32, gru_hidden_size=32, gru_num_layers=1,
            text_proj_dim=32, norm_groups=8)


def test_trainer_methods_in_process(tmp_path):
    """The core API without the CLI: build, validate (an untrained model is the identity: it explains exactly 0),
    save a verifiable checkpoint, close (which frees the output dir's lock)."""
    from golden_noise.runs import RunLock
    from golden_noise.training.checkpoints import verify_checkpoint
    from golden_noise.training.config import architecture
    from golden_noise.training.trainer import Trainer

    root = write_synthetic_dataset(tmp_path / "ds", n=10)
    config = TrainingConfig(dataset_dir=str(root), output_dir=str(tmp_path / "run"), batch_size=4,
                            dataloader_num_workers=0, validation_fraction=0.2, report_to="none")
    trainer = Trainer(config, architecture(**TINY)).build()
    try:
        assert trainer.model_config.noise_resolution == 8 and trainer.model_config.text_embed_dim == 16
        assert (trainer.total_steps, trainer.warmup) == (100, 5)  # 8 samples / 4 = 2 steps per epoch, 50 epochs
        report = trainer.validate()
        assert report["num_samples"] == 2 and report["final_step"]["explained_fraction"] == 0.0
        state = verify_checkpoint(trainer.save(0))
        assert state["global_step"] == 0 and state["args"]["cnn_num_blocks"] == [1, 1]
        with pytest.raises(UserError, match="in use by a running job"):
            RunLock(tmp_path / "run", "--output_dir").acquire()
    finally:
        trainer.close()
    RunLock(tmp_path / "run", "--output_dir").acquire().release()


def test_export_is_byte_reproducible(tmp_path):
    """Two identical trainings (the Trainer, in process) write identical export bytes (.safetensors and .json)
    and validation.json."""
    from golden_noise.training.config import architecture
    from golden_noise.training.trainer import Trainer

    root = write_synthetic_dataset(tmp_path / "ds", n=10)
    out = tmp_path / "run"
    config = TrainingConfig(dataset_dir=str(root), output_dir=str(out), max_train_steps=3, batch_size=4,
                            dataloader_num_workers=0, validation_fraction=0.2, report_to="none")
    names = [f"{FINAL_STEM}.safetensors", f"{FINAL_STEM}.json", "validation.json"]
    hashes = []
    for _ in range(3):
        Trainer(config, architecture(**TINY, predict_variance=True)).run()
        hashes.append({n: sha(out / n) for n in names})
        shutil.rmtree(out)
    assert hashes[0] == hashes[1] == hashes[2]


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_kill_9_and_resume_with_default_flags_is_exact(npd_dataset, tmp_path, capsys):
    """The seed's flags (default 2 loader workers, validation on, dropout, variance and KL; sizes scaled down),
    killed with SIGKILL right after checkpoint-4 appears and resumed with --resume_from_checkpoint latest: the
    export equals an uninterrupted run's, tensor for tensor. (Validations at 2, 4, 6, ...: one on each side of
    the kill and one at the checkpoint's own step.)"""
    args = ["--dataset_dir", npd_dataset, "--max_train_steps", 12, "--batch_size", 4, "--gradient_accumulation_steps",
            2, "--validation_fraction", 0.25, "--validation_steps", 2, "--save_steps", 4, "--max_checkpoints", 2,
            "--predict_variance", "--kl_weight", 0.01, "--learning_rate", 1e-3, "--report_to", "none", *ARCH]
    killed = tmp_path / "killed"
    env = {**os.environ, **ENV, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / TRAIN), *map(str, args), "--output_dir", str(killed),
           "--resume_from_checkpoint", "latest"]
    log = tmp_path / "killed.log"  # a file, not a pipe: the killed run's loader workers may linger a moment
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=f)
    deadline = time.monotonic() + 300
    while not (killed / "checkpoint-4").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert (killed / "checkpoint-4").is_dir() and not (killed / f"{FINAL_STEM}.safetensors").exists()  # mid-run
    capsys.readouterr()
    train(*args, "--output_dir", killed, "--resume_from_checkpoint", "latest", arch=())  # resumed in process
    assert "Resumed from" in capsys.readouterr().err and not list(killed.glob(".checkpoint-*.tmp"))
    train(*args, "--output_dir", tmp_path / "uninterrupted", arch=())
    assert_same_tensors(export_tensors(killed), export_tensors(tmp_path / "uninterrupted"))


# ---- damaged checkpoints and a busy output dir ---------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A finished 4-step run on a synthetic dataset with checkpoint-2 and checkpoint-4."""
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("ckpt")
    data = write_synthetic_dataset(root / "ds", n=8)
    args = ["--dataset_dir", data, "--max_train_steps", 4, "--batch_size", 4, "--validation_fraction", 0.25,
            "--validation_steps", 2, "--save_steps", 2, "--max_checkpoints", 0, "--report_to", "none"]
    train(*args, "--output_dir", root / "run")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    assert sorted(p.name for p in (root / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    return root / "run", args


class Evil:
    """A pickle that would leave a marker file if anything unpickled it with code execution."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def damage(ckpt: Path, case: str, tmp_path: Path) -> str:
    """Damage a checkpoint; returns the name of the file the error must name."""
    if case == "missing optimizer":
        (ckpt / "optimizer.bin").unlink()
        return "optimizer.bin"
    if case == "truncated model":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
        return "model.safetensors"
    if case == "pickle for a tensor file":
        Evil.marker = tmp_path / "pwned"
        (ckpt / "optimizer.bin").write_bytes(pickle.dumps(Evil()))
        return "optimizer.bin"
    if case == "unreadable random states":
        (ckpt / "random_states_0.pkl").write_bytes(b"\x80\x04 garbage")
        return "random_states_0.pkl"
    if case == "pickle with code for random states":
        Evil.marker = tmp_path / "pwned"
        (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(Evil()))
        return "random_states_0.pkl"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing optimizer", "truncated model", "pickle for a tensor file",
                                  "unreadable random states", "pickle with code for random states"])
def test_damaged_latest_checkpoint_is_a_one_line_error(case, checkpointed_run, tmp_path, capsys):
    run, args = checkpointed_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    name = damage(out / "checkpoint-4", case, tmp_path)
    before = tree_hashes(out)
    line = train_error(capsys, *args, "--output_dir", out, "--resume_from_checkpoint", "latest")
    assert f"checkpoint-4/{name}" in line and "--resume_fallback" in line
    assert tree_hashes(out) == before and not (tmp_path / "pwned").exists()
    # named explicitly, the same checkpoint gives the same error
    line = train_error(capsys, *args, "--output_dir", out, "--resume_from_checkpoint", out / "checkpoint-4")
    assert f"checkpoint-4/{name}" in line


def test_resume_fallback_uses_the_newest_intact_checkpoint(checkpointed_run, tmp_path, capsys):
    run, args = checkpointed_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "rnn_v3_model_final.safetensors").unlink()
    damage(out / "checkpoint-4", "unreadable random states", tmp_path)
    capsys.readouterr()
    summary = train(*args, "--output_dir", out, "--resume_from_checkpoint", "latest", "--resume_fallback")
    err = capsys.readouterr().err
    assert "resuming from " in err and "checkpoint-2, the newest intact checkpoint" in err
    assert "Resumed from" in err and "step 2" in err and summary["global_step"] == 4
    assert (out / "damaged-checkpoint-4/random_states_0.pkl").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert_same_tensors(export_tensors(out), export_tensors(run))  # exact: the intact checkpoint resumes exactly


def test_a_second_training_into_a_busy_output_dir_is_refused(checkpointed_run, tmp_path, capsys):
    """A running training (a real second process) holds its output dir: another one is refused with one line and
    leaves every file as it was."""
    run, args = checkpointed_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    cmd = [sys.executable, str(ROOT / TRAIN), *map(str, TINY_ARCH), *map(str, args), "--output_dir", str(out),
           "--max_train_steps", "100000", "--save_steps", "100000", "--resume_from_checkpoint", "latest"]
    log = tmp_path / "running.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=str(ROOT), env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=f)
    try:
        deadline = time.monotonic() + 120
        while f"pid {proc.pid}" not in (out / ".lock").read_text() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()[-3000:]
        before = tree_hashes(out)
        line = train_error(capsys, *args, "--output_dir", out, "--resume_from_checkpoint", "latest")
        assert f"{out} is in use by a running job (pid {proc.pid})" in line and "--output_dir" in line
        assert tree_hashes(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_rerunning_a_training_into_its_output_dir_without_resuming_is_refused(checkpointed_run, tmp_path, capsys):
    """A finished run's output dir (checkpoints and the export) rerun without --resume_from_checkpoint, with the same
    or another --max_train_steps: one line naming the resume flag and a new --output_dir; nothing changes. An
    export without checkpoints counts too."""
    run, args = checkpointed_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = tree_hashes(out)
    for extra in ([], ["--max_train_steps", 8]):
        line = train_error(capsys, *args, "--output_dir", out, *extra)
        assert f"--output_dir {out} holds an earlier training (checkpoint-2, checkpoint-4, {FINAL_STEM}.json)" in line
        assert "pass --resume_from_checkpoint latest" in line and "or choose a new --output_dir" in line
    assert tree_hashes(out) == before
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    line = train_error(capsys, *args, "--output_dir", out)
    assert f"holds an earlier training ({FINAL_STEM}.json)" in line


def test_resuming_with_other_byte_shaping_settings_is_refused(checkpointed_run, tmp_path, capsys):
    """--resume_from_checkpoint latest with another learning rate, batch size or dataset: one line naming each
    difference, nothing changes; the run's length, logging and the loader's workers may change. Without a
    checkpoint, the export's recorded settings are the ones to keep."""
    run, args = checkpointed_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = tree_hashes(out)
    line = train_error(capsys, *args, "--output_dir", out, "--resume_from_checkpoint", "latest", "--learning_rate",
                       1e-3, "--batch_size", 2, "--dataset_dir", tmp_path / "other_ds")
    data = args[args.index("--dataset_dir") + 1]
    assert line.startswith(f"error: {out / 'checkpoint-4'} holds a training made with other inputs or settings (")
    assert f"dataset_dir: '{data}' -> '{tmp_path / 'other_ds'}'" in line and "batch_size: 4 -> 2" in line
    assert "learning_rate: 0.0001 -> 0.001" in line and "resume with the same settings" in line
    line = train_error(capsys, *args, "--output_dir", out, "--resume_from_checkpoint", "latest", "--adam_beta2", 0.99)
    assert "(adam_beta2: 0.999 -> 0.99)" in line
    assert tree_hashes(out) == before
    summary = train(*args, "--output_dir", out, "--resume_from_checkpoint", "latest", "--logging_steps", 1,
                    "--max_checkpoints", 5, "--dataloader_num_workers", 0)
    assert summary["global_step"] == 4
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    line = train_error(capsys, *args, "--output_dir", out, "--resume_from_checkpoint", "latest", "--seed", 7)
    assert f"{out / FINAL_STEM}.json holds a training made with other inputs or settings (seed: 42 -> 7)" in line


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_last_one(tmp_path, capsys, monkeypatch):
    """A checkpoint write that fails with ENOSPC (accelerate's writer raising after a partial file): one line naming
    the checkpoint and the intact one before it; no half-written folder stays; resuming from the kept checkpoint
    ends where an uninterrupted run does."""
    import errno

    import accelerate.checkpointing

    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    args = ["--dataset_dir", root, "--max_train_steps", 6, "--batch_size", 4, "--validation_fraction", 0.25,
            "--validation_steps", 2, "--save_steps", 2, "--max_checkpoints", 0, "--report_to", "none"]
    out = tmp_path / "run"
    real = accelerate.checkpointing.save

    def full_disk(obj, f, *a, **k):
        if ".checkpoint-4.tmp" in str(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(accelerate.checkpointing, "save", full_disk)
    line = train_error(capsys, *args, "--output_dir", out)
    assert line.startswith(f"error: cannot write {out / 'checkpoint-4'} (OSError: [Errno 28] No space left on device)")
    assert f"the last good checkpoint {out / 'checkpoint-2'} is intact" in line
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert not (out / f"{FINAL_STEM}.safetensors").exists()
    from golden_noise.training.checkpoints import verify_checkpoint

    assert verify_checkpoint(out / "checkpoint-2")["global_step"] == 2
    monkeypatch.setattr(accelerate.checkpointing, "save", real)
    train(*args, "--output_dir", out, "--resume_from_checkpoint", "latest")
    train(*args, "--output_dir", tmp_path / "uninterrupted")
    assert_same_tensors(export_tensors(out), export_tensors(tmp_path / "uninterrupted"))


# ---- mixed precision, progress, launchers --------------------------------------------------------------------

def test_mixed_precision_follows_the_launcher_unless_given(tmp_path, monkeypatch, capsys):
    """accelerate launch --mixed_precision bf16 sets ACCELERATE_MIXED_PRECISION: the run trains in bf16 unless
    --mixed_precision is given."""
    from accelerate.state import AcceleratorState, GradientState

    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    args = ["--dataset_dir", root, "--max_train_steps", 2, "--batch_size", 4, "--validation_fraction", 0.25,
            "--report_to", "none"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    summary = train(*args, "--output_dir", tmp_path / "launcher")
    assert summary["mixed_precision"] == "bf16" and "mixed_precision=bf16" in capsys.readouterr().err
    assert summary["validation"]["num_samples"] == 2
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    summary = train(*args, "--output_dir", tmp_path / "flag", "--mixed_precision", "no")
    assert summary["mixed_precision"] == "no" and "mixed_precision=no" in capsys.readouterr().err
    assert not torch.equal(export_tensors(tmp_path / "launcher")["mean_head.weight"],
                           export_tensors(tmp_path / "flag")["mean_head.weight"])  # bf16 autocast really ran


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only(tmp_path, monkeypatch):
    root = write_synthetic_dataset(tmp_path / "ds", n=8)
    args = ["--dataset_dir", root, "--max_train_steps", 5, "--batch_size", 4, "--validation_fraction", 0,
            "--report_to", "none", "--logging_steps", 2]
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    train(*args, "--output_dir", tmp_path / "tty")
    shown = terminal.getvalue()
    assert "training: 100%" in shown and "5/5" in shown and "loss=" in shown
    assert "step 4/5 epoch 1" in shown  # log lines still reach the terminal, above the bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file: no bar, only log lines
    train(*args, "--output_dir", tmp_path / "log")
    logged = sys.stderr.getvalue()
    assert "step 4/5 epoch 1" in logged and "training:" not in logged and "\r" not in logged


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_train_sh_takes_the_latent_shape_from_the_dataset(tmp_path):
    """scripts/train.sh (the seed's command: full-size architecture flags, no --noise_resolution) on a dataset of
    8x8 latents, launched by accelerate with --mixed_precision bf16, which the script follows."""
    root = write_synthetic_dataset(tmp_path / "ds", n=4, shape=(4, 8, 8))
    out = tmp_path / "out"
    bin_dir = tmp_path / "bin"  # `accelerate` run by this interpreter (a virtualenv may lack the console script)
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(
        f'#!/bin/sh\nexec "{sys.executable}" -m accelerate.commands.accelerate_cli "$@"\n')
    (bin_dir / "accelerate").chmod(0o755)
    env = {**os.environ, **ENV, "DATASET_DIR": str(root), "OUTPUT_DIR": str(out), "MIXED_PRECISION": "bf16",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           # smaller layers (train.sh's structure kept: 4 CNN stages of 2 blocks, 2 GRU layers), one step
           "EXTRA_ARGS": "--cnn_base_filters 8 --cnn_max_filters 16 --cnn_feat_dim 16 --gru_hidden_size 16 "
                         "--text_proj_dim 16 --norm_groups 8 --max_train_steps 1 --batch_size 2 "
                         "--gradient_accumulation_steps 1 --dataloader_num_workers 0 --validation_fraction 0 "
                         "--report_to none"}
    proc = subprocess.run(["bash", str(ROOT / "scripts/train.sh")], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, meta = NoiseSequenceRNN_v3.from_pretrained(out)
    cfg = meta["model_config"]
    assert cfg["noise_resolution"] == 8 and cfg["cnn_num_blocks"] == [2, 2, 2, 2] and cfg["gru_num_layers"] == 2
    assert cfg["predict_variance"] and meta["training"]["args"]["kl_weight"] == 0.01
    assert meta["training"]["mixed_precision"] == "bf16" and meta["training"]["args"]["mixed_precision"] is None


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
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
    assert "num_processes=2" in proc.stderr and "training:" not in proc.stderr
    summary = json.loads((out / "validation.json").read_text())
    # 48 training samples, 4 per process, 2 processes, 2 micro-batches per step: 3 steps per epoch, 2 epochs
    assert summary["num_processes"] == 2 and summary["global_step"] == 6
    assert summary["validation"]["num_samples"] == 16  # gathered across processes without duplicates
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5", "checkpoint-6"]
    assert (out / "checkpoint-6/random_states_1.pkl").is_file()
    _, meta = NoiseSequenceRNN_v3.from_pretrained(out / f"{FINAL_STEM}.json")
    assert meta["model_config"]["predict_variance"] and meta["training"]["args"]["kl_weight"] == 0.01


def test_the_trainer_declares_its_state_in_init():
    """Every attribute a Trainer method sets is declared (with a comment-sized meaning) in Trainer.__init__, so the
    trainer's state reads in one place."""
    import ast

    tree = ast.parse((ROOT / "src/golden_noise/training/trainer.py").read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")

    def assigned(fn) -> set[str]:
        out = set()
        for node in ast.walk(fn):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
            out.update(e.attr for t in targets for e in ast.walk(t) if isinstance(e, ast.Attribute)
                       and isinstance(e.value, ast.Name) and e.value.id == "self")
        return out

    methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    declared = assigned(methods.pop("__init__"))
    assert len(declared) > 20
    assert {name: sorted(assigned(f) - declared) for name, f in methods.items() if assigned(f) - declared} == {}
    loop = methods["train"]
    assert loop.end_lineno - loop.lineno < 40  # the loop reads on one screen
