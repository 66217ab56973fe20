"""The sharded dataset read for training: conversion from loose files (scripts/convert_dataset.py), the same
batches as the loose-file reader (exported weights equal tensor for tensor), integrity checks before training
(sha256 of every shard; each loose file's CRC-32 and pickle), bounded memory."""
from __future__ import annotations

import json
import os

import pytest
import torch

from golden_noise.dataset import format as F
from golden_noise.dataset.reader import ShardedSequenceDataset, open_dataset
from golden_noise.errors import UserError
from golden_noise.io import tensor_bytes
from golden_noise.model.rnn_seq_model_v3 import FINAL_STEM
from tests.conftest import dataset_samples
from tests.test_generate import flip_byte, payload_offset, run_main, same_tree
from tests.test_training import fresh_process_state  # noqa: F401  (an autouse fixture: a fresh process each run)
from tests.test_training import (ARCH, assert_same_tensors, export_tensors, sample_file, train, train_error,
                                 write_synthetic_dataset)

CONVERT = "scripts/convert_dataset.py"


def convert(capsys, old, new, *extra) -> tuple[int, str, str]:
    return run_main(capsys, CONVERT, old, new, *extra)


@pytest.fixture()
def loose(tmp_path):
    """A 24-sample format-1 dataset (float16, the storage dtype stage 2 uses)."""
    return write_synthetic_dataset(tmp_path / "loose", n=24, dtype=torch.float16)


def test_conversion_keeps_every_sample_and_resumes(loose, tmp_path, capsys, monkeypatch):
    new = tmp_path / "sharded"
    per_sample = F.sample_bytes(F.read_run_config_json(loose))
    monkeypatch.setattr(F, "ROW_GROUP_BYTES", 3 * per_sample)  # row groups of 3 samples: 3, 3, 2 per shard
    code, stdout, stderr = convert(capsys, loose, new, "--samples_per_shard", 8)
    assert code == 0, stderr
    assert "done: 24 samples in 3 shard(s)" in stdout and "72 files" in stdout
    index = json.loads((new / F.INDEX).read_text())
    assert [(s["first_id"], s["last_id"], s["rows"]) for s in index["shards"]] == [(0, 7, 8), (8, 15, 8),
                                                                                   (16, 23, 8)]
    config = json.loads((new / F.RUN_CONFIG).read_text())
    assert config["format_version"] == 2 and config["sharding"]["rows_per_group"] == 3
    samples = dataset_samples(new)
    for i in range(24):
        for column, name in F.SHARD_COLUMN.items():
            if column != "prompt_embeds_file":
                assert torch.equal(samples[i][name], torch.load(loose / F.sample_files(i)[column]))
        assert samples[i]["prompt"] == f"prompt {i}" and samples[i]["seed"] == i
    # killed after the first shard: the same command finishes the conversion, with the same bytes
    resumed = tmp_path / "resumed"
    import golden_noise.dataset.convert as convert_module

    real_seal, calls = convert_module.seal_shard, []

    def seal_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_seal(*args, **kwargs)

    monkeypatch.setattr(convert_module, "seal_shard", seal_then_die)
    assert convert(capsys, loose, resumed, "--samples_per_shard", 8)[0] == 130
    monkeypatch.setattr(convert_module, "seal_shard", real_seal)
    code, _, stderr = convert(capsys, loose, resumed, "--samples_per_shard", 8)
    assert code == 0, stderr
    assert same_tree(new, resumed)
    # refused: a NEW that holds something else, an OLD that is already sharded, an incomplete OLD
    line = lambda err: err.strip().splitlines()[-1]  # noqa: E731
    code, _, err = convert(capsys, loose, resumed, "--samples_per_shard", 16)
    assert code == 2 and "holds another dataset" in line(err)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    assert "is not empty" in line(convert(capsys, loose, tmp_path / "busy")[2])
    assert "already a sharded dataset" in line(convert(capsys, new, tmp_path / "again")[2])
    config = json.loads((loose / F.RUN_CONFIG).read_text())
    (loose / F.RUN_CONFIG).write_text(json.dumps({**config, "num_prompts": 30}))
    assert "lists 24 of the 30 samples" in line(convert(capsys, loose, tmp_path / "more")[2])


def test_sharded_dataset_trains_exactly_as_its_loose_files(loose, tmp_path, capsys, monkeypatch):
    """The reader feeds the trainer the same batches in the same order from shards as from loose files: a dataset
    and its conversion (3 shards of row groups of 3) train to the same weights, with 2 loader workers, dropout,
    variance and KL, across epochs."""
    per_sample = F.sample_bytes(F.read_run_config_json(loose))
    monkeypatch.setattr(F, "ROW_GROUP_BYTES", 3 * per_sample)
    new = tmp_path / "sharded"
    assert convert(capsys, loose, new, "--samples_per_shard", 8)[0] == 0
    args = ["--max_train_steps", 7, "--batch_size", 4, "--validation_fraction", 0.25, "--validation_steps", 3,
            "--predict_variance", "--kl_weight", 0.01, "--dropout", 0.2, "--learning_rate", 1e-3,
            "--report_to", "none", "--dataloader_num_workers", 2]
    a = train("--dataset_dir", loose, "--output_dir", tmp_path / "a", *args, arch=ARCH)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    b = train("--dataset_dir", new, "--output_dir", tmp_path / "b", *args, arch=ARCH)
    assert a["validation_ids"] == b["validation_ids"] and a["validation"] == b["validation"]
    assert_same_tensors(export_tensors(tmp_path / "a"), export_tensors(tmp_path / "b"))


def test_a_damaged_or_incomplete_sharded_dataset_stops_before_the_first_step(loose, tmp_path, capsys):
    new = tmp_path / "sharded"
    assert convert(capsys, loose, new, "--samples_per_shard", 8)[0] == 0
    shard = new / "data/shard-00001.parquet"
    flip_byte(shard, shard.stat().st_size // 2)
    out = tmp_path / "out"
    common = ["--dataset_dir", new, "--output_dir", out, "--max_train_steps", 2, "--batch_size", 4,
              "--validation_fraction", 0.25, "--report_to", "none"]
    line = train_error(capsys, *common)
    assert "data/shard-00001.parquet fails its sha256 check (a damaged byte)" in line and "--skip_bad_samples" in line
    assert not list(out.glob("checkpoint-*")) and not (out / f"{FINAL_STEM}.safetensors").exists()
    summary = train(*common, "--skip_bad_samples")
    assert summary["skipped_bad_samples"] == 8 and summary["damaged_files"] == 1
    assert summary["train_samples"] + summary["validation_samples"] == 16
    assert not set(range(8, 16)) & set(summary["validation_ids"])
    # an unfinished dataset (no index: another run's shard is still missing) is named as such
    from golden_noise.dataset.writer import remove_index

    remove_index(new)
    (new / "data/shard-00002.parquet").unlink()
    line = train_error(capsys, *common[:3], tmp_path / "out2", *common[4:])
    assert "has no index.json: the dataset is incomplete (2 of 3 shards sealed)" in line and "--finalize" in line


@pytest.mark.parametrize("case", ["flipped payload byte", "foreign pickle in a torch zip"])
def test_a_damaged_loose_file_is_found_before_training(case, loose, tmp_path, capsys):
    """Format 1 has no index: each file's own checksums (the CRC-32 torch.save records) and its pickle are
    checked before the first step; before, a flipped payload byte was trained on (-0.229 became -15032)."""
    target = sample_file(loose, 5, "golden_sequence_file")
    if case == "flipped payload byte":
        flip_byte(target, payload_offset(target) + 3)
        expected = "fails its checksum"
    else:
        target.write_bytes(tensor_bytes(os.getcwd))
        expected = "names 'posix getcwd', not a plain tensor"
    out = tmp_path / "out"
    line = train_error(capsys, "--dataset_dir", loose, "--output_dir", out, "--max_train_steps", 1, "--report_to",
                       "none")
    assert target.name in line and expected in line and not list(out.glob("checkpoint-*"))


def test_the_reader_keeps_a_bounded_cache_and_reads_what_the_shards_hold(loose, tmp_path, capsys, monkeypatch):
    per_sample = F.sample_bytes(F.read_run_config_json(loose))
    monkeypatch.setattr(F, "ROW_GROUP_BYTES", 2 * per_sample)
    new = tmp_path / "sharded"
    assert convert(capsys, loose, new, "--samples_per_shard", 8)[0] == 0
    group_bytes = 2 * per_sample
    data = open_dataset(new, validation_fraction=0.0, cache_bytes=3 * group_bytes)
    assert isinstance(data.train, ShardedSequenceDataset) and len(data.train.shards) == 3
    loose_data = open_dataset(loose, validation_fraction=0.0)
    for i in torch.randperm(24, generator=torch.Generator().manual_seed(0)).tolist():
        a, b = data.train[i], loose_data.train[i]
        assert a["id"] == b["id"] and all(torch.equal(a[k], b[k]) for k in ("source", "golden", "text"))
        assert data.train.cache.bytes <= 3 * group_bytes and len(data.train.cache.groups) <= 3
    with pytest.raises(UserError, match="must be at least 1"):
        open_dataset(new, max_seq_len=0)


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_shard_pages_read_directly_equal_what_pyarrow_decodes(storage, tmp_path):
    """The reader's direct page read (dataset.reader._plain_values) gives pyarrow's values for every array column:
    SDXL-size samples (a column chunk of two data pages), row groups of several samples, float32 storage; a shard
    with other Parquet options (compressed) is read by pyarrow instead."""
    import numpy as np

    from golden_noise.dataset.shards import ShardFile
    from golden_noise.dataset.writer import SampleSpec, ShardSample, loose_chunks, seal_shard

    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, storage)
    for name, shape, n in (("sdxl", (4, 128, 128), 2), ("small", (4, 8, 8), 7)):
        root = tmp_path / name
        loose = root / "loose"
        for i in range(n):
            F.write_loose_sample(loose, i, {"source_noise_file": torch.randn(shape, generator=g).to(dtype),
                                            "golden_sequence_file": torch.randn(10, *shape, generator=g).to(dtype),
                                            "text_embedding_file": torch.randn(1280, generator=g).to(dtype)})
        config = {"latent_shape": list(shape), "num_steps": 10, "storage_dtype": storage, "batch_size": 1,
                  "text_embedding": {"dim": 1280}}
        for options in (F.PARQUET_OPTIONS, {**F.PARQUET_OPTIONS, "compression": "zstd"}):
            config["sharding"] = {**F.sharding(config, 8), "rows_per_group": 3, "parquet": options}
            samples = [ShardSample(i, f"p{i}", i) for i in range(n)]
            seal_shard(root, 0, samples, config, loose_chunks(loose, samples, SampleSpec.of(config)))
            shard = ShardFile(F.shard_path(root, 0))
            meta = shard.file.metadata
            if name == "sdxl" and options is F.PARQUET_OPTIONS:
                golden = meta.row_group(0).column(shard.leaves()["golden"][0])
                assert golden.total_compressed_size > 1 << 20  # more than one default 1 MiB data page
            for group in range(shard.num_row_groups):
                fast = shard.read_row_group(group, ("source", "golden", "text"))
                slow = shard._arrow_columns(group, ["source", "golden", "text"])
                direct = shard._fast_column(meta.row_group(group), "golden")
                assert (direct is None) == (options is not F.PARQUET_OPTIONS)
                for column, values in fast.items():
                    assert values.dtype == np.dtype(storage)
                    assert np.array_equal(values.reshape(-1), slow[column].reshape(-1), equal_nan=True), column
            rows = [int(i) for i in shard.column("id")]
            assert rows == list(range(n))
            F.shard_path(root, 0).unlink()


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_dataset_bench_reports_files_bytes_and_loader_headroom(tmp_path):
    """bench/bench_dataset.py --quick: files and bytes per sample of both formats, the integrity checks' speed and
    the loader's rates against the GPU's measured training rate, each ratio from the rows it printed."""
    from tests.conftest import run_cli

    out = tmp_path / "bench.json"
    proc = run_cli("bench/bench_dataset.py", "--quick", "--num_workers", 0, "--json", out,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    sizes = {r["format"]: r for r in res["footprint"]}
    assert sizes["loose (format 1)"]["files_per_sample"] == 3 and sizes["shards (format 2)"]["data_files"] == 1
    assert sizes["shards (format 2)"]["files_at_100k"] < 1000 < sizes["loose (format 1)"]["files_at_100k"]
    rates = res["train_rates"]
    assert rates["h200_bf16"] == pytest.approx(96.2, abs=0.1) and rates["h200_fp32"] == pytest.approx(77.4, abs=0.1)
    for row in res["loader"]:
        assert row["headroom_vs_h200_bf16"] == pytest.approx(row["loader_samples_s"] / rates["h200_bf16"])
    assert res["integrity"]["shard_sha256_GB_s"] > 0 and "[ok] 100k samples fit" in proc.stdout
