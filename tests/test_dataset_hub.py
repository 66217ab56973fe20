"""Sharded datasets on the Hub, offline: training from a hub dataset id found in a pre-populated Hugging Face cache
(HF_HUB_OFFLINE=1) as from the local folder, 🤗 datasets reading the cached snapshot, and scripts/push_dataset.py
against a local stand-in for the Hub's write API (HfApi.create_repo / upload_folder), checking the exact files and
card sent."""
from __future__ import annotations

import pytest

from golden_noise.testing.hub import UploadRecorder, cache_repo
from tests.test_dataset import convert, loose  # noqa: F401  (the fixture)
from tests.test_generate import flip_byte, run_main
from tests.test_training import fresh_process_state  # noqa: F401  (an autouse fixture: a fresh process each run)
from tests.test_training import ARCH, assert_same_tensors, export_tensors, train, train_error

PUSH = "scripts/push_dataset.py"
REPO = "golden-user/npd-toy"


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub allowed to 'reach' the hub with a token (every write goes to an UploadRecorder)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return UploadRecorder.install(monkeypatch)


@pytest.fixture()
def sharded(loose, tmp_path, capsys):  # noqa: F811
    new = tmp_path / "sharded"
    assert convert(capsys, loose, new, "--samples_per_shard", 8)[0] == 0
    return new


def test_training_from_a_hub_dataset_id_equals_training_from_its_folder(sharded, hub_cache, tmp_path, capsys):
    snapshot = cache_repo(hub_cache, REPO, sharded, repo_type="dataset")
    args = ["--max_train_steps", 4, "--batch_size", 4, "--validation_fraction", 0.25, "--report_to", "none",
            "--dataloader_num_workers", 0]
    local = train("--dataset_dir", sharded, "--output_dir", tmp_path / "local", *args, arch=ARCH)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    capsys.readouterr()
    hub = train("--dataset_dir", REPO, "--output_dir", tmp_path / "hub", *args, arch=ARCH)
    assert f"--dataset_dir {REPO}: the hub dataset's files in {snapshot}" in capsys.readouterr().err
    assert local["validation_ids"] == hub["validation_ids"]
    assert_same_tensors(export_tensors(tmp_path / "local"), export_tensors(tmp_path / "hub"))
    # 🤗 datasets reads the cached snapshot too (offline, datasets 5.2 resolves a hub id only online: pass the
    # snapshot's folder, which huggingface_hub.snapshot_download returns from the cache)
    import datasets
    from huggingface_hub import snapshot_download

    folder = snapshot_download(REPO, repo_type="dataset")
    rows = list(datasets.load_dataset(folder, split="train", streaming=True).with_format("torch"))
    assert [int(r["id"]) for r in rows] == list(range(24)) and rows[5]["golden"].shape == (3, 4, 8, 8)


def test_a_hub_dataset_that_is_not_there_is_one_line(hub_cache, tmp_path, capsys):
    line = train_error(capsys, "--dataset_dir", "golden-user/missing", "--output_dir", tmp_path / "out",
                       "--max_train_steps", 1, "--report_to", "none")
    assert "--dataset_dir golden-user/missing is neither a local path nor in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line
    # a repo that is in the cache but is no golden-noise dataset
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "train.csv").write_text("a,b\n1,2\n")
    cache_repo(hub_cache, "golden-user/other", other, repo_type="dataset")
    line = train_error(capsys, "--dataset_dir", "golden-user/other", "--output_dir", tmp_path / "out",
                       "--max_train_steps", 1, "--report_to", "none")
    assert "has no run_config.json: it is not a golden-noise sequence dataset" in line


def test_push_dataset_sends_the_shards_and_a_card(sharded, online, tmp_path, capsys, monkeypatch):
    before = {p: p.read_bytes() for p in sharded.rglob("*") if p.is_file()}
    code, stdout, stderr = run_main(capsys, PUSH, sharded, REPO, "--private", "--prompt_source",
                                    "24 synthetic prompts")
    assert code == 0, stderr
    assert "done: 24 samples" in stdout and f"https://huggingface.co/datasets/{REPO}" in stdout
    assert [(c["repo_id"], c["repo_type"], c["private"]) for c in online.created] == [(REPO, "dataset", True)]
    (upload,) = online.uploads
    assert upload.repo_id == REPO and upload.repo_type == "dataset" and upload.delete_patterns == ["data/*.parquet"]
    assert upload.commit_message == "golden-noise dataset: 24 samples in 3 shards" and upload.private
    sent = upload.files
    assert sorted(sent) == ["README.md", "data/shard-00000.parquet", "data/shard-00001.parquet",
                            "data/shard-00002.parquet", "index.json", "run_config.json"]
    for name in sent:
        if name != "README.md":
            assert sent[name] == (sharded / name).read_bytes(), name
    card = sent["README.md"].decode()
    import yaml

    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train",
                                                                          "path": "data/shard-*.parquet"}]}]
    assert meta["task_categories"] == ["text-to-image"] and "golden-noise" in meta["tags"]
    for text in ("# Golden-noise sequences for synthetic", "| prompts | 24 synthetic prompts: 24 prompts",
                 f'load_dataset("{REPO}", split="train", streaming=True)', f"--dataset_dir {REPO}",
                 "| files | 3 Parquet shard(s) of at most 8 samples", "n = 3"):
        assert text in card, text
    assert {p: p.read_bytes() for p in sharded.rglob("*") if p.is_file()} == before  # the dataset is unchanged
    # what was sent, found in a cache as a download would leave it, trains like the folder
    from golden_noise.testing.hub import use_offline_cache

    cache_repo(use_offline_cache(monkeypatch, tmp_path / "cache"), REPO, sent, repo_type="dataset")
    summary = train("--dataset_dir", REPO, "--output_dir", tmp_path / "run", "--max_train_steps", 1, "--batch_size",
                    4, "--report_to", "none", "--dataloader_num_workers", 0, arch=ARCH)
    assert summary["train_samples"] + summary["validation_samples"] == 24


def test_push_dataset_refuses_before_sending_anything(sharded, loose, online, capsys, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    line = lambda err: err.strip().splitlines()[-1]  # noqa: E731
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "HF_HUB_OFFLINE=1 forbids uploads" in line(run_main(capsys, PUSH, sharded, REPO)[2])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert "names no owner" in line(run_main(capsys, PUSH, sharded, "npd")[2])
    assert "format-1 dataset" in line(run_main(capsys, PUSH, loose, REPO)[2])
    shard = sharded / "data/shard-00002.parquet"
    flip_byte(shard, shard.stat().st_size // 2)
    code, _, err = run_main(capsys, PUSH, sharded, REPO)
    assert code == 2 and "shard-00002.parquet fails its sha256 check" in line(err)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert "needs a Hugging Face token" in line(run_main(capsys, PUSH, sharded, REPO)[2])
    assert online.created == [] and online.uploads == []
