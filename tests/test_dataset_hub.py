"""Sharded datasets on the Hub, offline: training from a hub dataset id found in a pre-populated Hugging Face cache
(HF_HUB_OFFLINE=1) as from the local folder, 🤗 datasets reading the cached snapshot, and scripts/push_dataset.py
against a local stand-in for the Hub's write API (HfApi.create_repo / upload_folder), checking the exact files and
card sent."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from golden_noise.dataset import format as F
from tests.test_dataset import convert, loose  # noqa: F401  (the fixture)
from tests.test_generate import flip_byte, run_main
from tests.test_training import (ARCH, assert_same_tensors, export_tensors, fresh_process_state, train,  # noqa: F401
                                 train_error)

PUSH = "scripts/push_dataset.py"
REPO = "golden-user/npd-toy"


def cache_repo(cache: Path, repo_id: str, folder: Path, repo_type: str = "dataset") -> Path:
    """Put `folder`'s files into a Hugging Face cache as huggingface_hub lays a downloaded repo out
    (`datasets--owner--name/blobs/<sha256>`, `snapshots/<commit>/<path>` links, `refs/main`); returns the snapshot."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != ".lock"}
    commit = hashlib.sha1(json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
                          .encode()).hexdigest()
    storage = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return storage / "snapshots" / commit


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face hub cache that huggingface_hub reads with no network (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture()
def sharded(loose, tmp_path, capsys):  # noqa: F811
    new = tmp_path / "sharded"
    assert convert(capsys, loose, new, "--samples_per_shard", 8)[0] == 0
    return new


def test_training_from_a_hub_dataset_id_equals_training_from_its_folder(sharded, offline_cache, tmp_path, capsys):
    snapshot = cache_repo(offline_cache, REPO, sharded)
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


def test_a_hub_dataset_that_is_not_there_is_one_line(offline_cache, tmp_path, capsys):
    line = train_error(capsys, "--dataset_dir", "golden-user/missing", "--output_dir", tmp_path / "out",
                       "--max_train_steps", 1, "--report_to", "none")
    assert "--dataset_dir golden-user/missing is neither a local folder nor in the Hugging Face cache" in line
    assert "HF_HUB_OFFLINE=1" in line
    # a repo that is in the cache but is no golden-noise dataset
    other = tmp_path / "other"
    (other / "data").mkdir(parents=True)
    (other / "data" / "train.csv").write_text("a,b\n1,2\n")
    cache_repo(offline_cache, "golden-user/other", other)
    line = train_error(capsys, "--dataset_dir", "golden-user/other", "--output_dir", tmp_path / "out",
                       "--max_train_steps", 1, "--report_to", "none")
    assert "has no run_config.json: it is not a golden-noise sequence dataset" in line


class HubStandIn:
    """Records what HfApi.create_repo and HfApi.upload_folder would have sent (each file's bytes)."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi, constants

        self.created, self.uploads = [], []
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token")

        def create_repo(api, repo_id, *, repo_type=None, private=None, exist_ok=False, **kw):
            self.created.append({"repo_id": repo_id, "repo_type": repo_type, "private": private, "exist_ok": exist_ok})
            return f"https://huggingface.co/datasets/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, repo_type=None, commit_message=None, delete_patterns=None,
                          **kw):
            root = Path(folder_path)
            self.uploads.append({"repo_id": repo_id, "repo_type": repo_type, "message": commit_message,
                                 "delete": delete_patterns, "files": {p.relative_to(root).as_posix(): p.read_bytes()
                                                                      for p in sorted(root.rglob("*"))
                                                                      if p.is_file()}})
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/datasets/{repo_id}/commit/1"})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_dataset_sends_the_shards_and_a_card(sharded, tmp_path, capsys, monkeypatch):
    hub = HubStandIn(monkeypatch)
    before = {p: p.read_bytes() for p in sharded.rglob("*") if p.is_file()}
    code, stdout, stderr = run_main(capsys, PUSH, sharded, REPO, "--private", "--prompt_source",
                                    "24 synthetic prompts")
    assert code == 0, stderr
    assert f"done: 24 samples" in stdout and f"https://huggingface.co/datasets/{REPO}" in stdout
    assert hub.created == [{"repo_id": REPO, "repo_type": "dataset", "private": True, "exist_ok": True}]
    (upload,) = hub.uploads
    assert upload["repo_id"] == REPO and upload["repo_type"] == "dataset" and upload["delete"] == ["data/*.parquet"]
    sent = upload["files"]
    assert sorted(sent) == ["README.md", "data/shard-00000.parquet", "data/shard-00001.parquet",
                            "data/shard-00002.parquet", "index.json", "run_config.json"]
    for name in sent:
        if name != "README.md":
            assert sent[name] == (sharded / name).read_bytes(), name
    card = sent["README.md"].decode()
    assert card.startswith("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: "
                           "data/shard-*.parquet\n")
    for text in ("# Golden-noise sequences for synthetic", "| prompts | 24 synthetic prompts: 24 prompts",
                 f'load_dataset("{REPO}", split="train", streaming=True)', f"--dataset_dir {REPO}",
                 "| files | 3 Parquet shard(s) of at most 8 samples", "n = 3"):
        assert text in card, text
    assert {p: p.read_bytes() for p in sharded.rglob("*") if p.is_file()} == before  # the dataset is unchanged
    # what was sent, found in a cache as a download would leave it, trains like the folder
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    sent_dir = tmp_path / "sent"
    for name, data in sent.items():
        (sent_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (sent_dir / name).write_bytes(data)
    cache_repo(cache, REPO, sent_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    summary = train("--dataset_dir", REPO, "--output_dir", tmp_path / "run", "--max_train_steps", 1, "--batch_size",
                    4, "--report_to", "none", "--dataloader_num_workers", 0, arch=ARCH)
    assert summary["train_samples"] + summary["validation_samples"] == 24


def test_push_dataset_refuses_before_sending_anything(sharded, loose, tmp_path, capsys, monkeypatch):  # noqa: F811
    from huggingface_hub import constants

    hub = HubStandIn(monkeypatch)
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
    assert hub.created == [] and hub.uploads == []
