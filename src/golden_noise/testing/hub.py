"""A Hugging Face Hub stand-in for offline tests, for model and dataset repos alike.

- `cache_repo`: put a repo's files into a Hugging Face cache exactly as huggingface_hub lays it out
  (`{models,datasets}--owner--name/blobs/<sha256>`, `snapshots/<commit>/<path>` symlinks, `refs/<revision>`), so
  `snapshot_download` (and what builds on it) finds it with HF_HUB_OFFLINE=1.
- `use_offline_cache`: point huggingface_hub (and datasets, if imported) at a cache folder in offline mode, in this
  process (module constants) and in subprocesses (environment variables).
- `UploadRecorder`: replaces `HfApi.create_repo` / `HfApi.upload_folder` and records what would have been sent
  (every file's bytes, the repo type, privacy, commit message, delete patterns, token).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path


def cache_repo(cache_dir: str | os.PathLike, repo_id: str, files: dict[str, bytes] | str | os.PathLike,
               repo_type: str = "model", revision: str = "main", commit: str | None = None) -> Path:
    """Add a repo holding `files` ({path in repo: bytes}, or a folder whose files are copied) to the cache at
    `cache_dir`, under `revision` (a branch name) at `commit` (default: derived from the files); returns the
    snapshot folder (what snapshot_download returns)."""
    from huggingface_hub.file_download import repo_folder_name

    if not isinstance(files, dict):
        root = Path(files)
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    commit = commit or hashlib.sha1(b"".join(k.encode() + hashlib.sha256(v).digest()
                                             for k, v in sorted(files.items()))).hexdigest()
    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    snapshot = storage / "snapshots" / commit
    for name, data in files.items():
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


def use_offline_cache(monkeypatch, cache_dir: str | os.PathLike) -> Path:
    """Make huggingface_hub resolve repos from `cache_dir` with no network (HF_HUB_OFFLINE), for this process and
    its subprocesses; undone by `monkeypatch` at the end of the test."""
    import sys

    from huggingface_hub import constants

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None and hasattr(datasets_config, "HF_HUB_OFFLINE"):
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)
    return cache_dir


@dataclass
class Upload:
    """One recorded upload_folder call (with the create_repo call before it)."""

    repo_id: str
    repo_type: str
    files: dict[str, bytes]
    commit_message: str | None
    delete_patterns: list[str] | None
    revision: str | None
    private: bool | None
    token: str | None


@dataclass
class UploadRecorder:
    """Stands in for the Hub's write API: install with `UploadRecorder.install(monkeypatch)`."""

    uploads: list[Upload] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)

    @classmethod
    def install(cls, monkeypatch) -> "UploadRecorder":
        from huggingface_hub import HfApi

        rec = cls()

        def create_repo(api, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kw):
            rec.created.append({"repo_id": repo_id, "repo_type": repo_type or "model", "private": private,
                                "exist_ok": exist_ok, "token": token or api.token})
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(api, *, repo_id, folder_path, repo_type=None, revision=None, commit_message=None,
                          delete_patterns=None, token=None, **kw):
            root = Path(folder_path)
            files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
            made = next((c for c in reversed(rec.created) if c["repo_id"] == repo_id), {})
            rec.uploads.append(Upload(repo_id, repo_type or "model", files, commit_message,
                                      list(delete_patterns) if delete_patterns else None, revision,
                                      made.get("private"), token or api.token))
            url = f"https://huggingface.co/{repo_id}/commit/{len(rec.uploads)}"
            return type("CommitInfo", (), {"commit_url": url})()

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return rec


def unseal_export(weights: str | os.PathLike) -> Path:
    """Rewrite an export's weights file as exports were written before the seal (no config_sha256 in its metadata,
    same tensors): what a user's older exports look like."""
    from safetensors.torch import load_file

    from ..export import SEAL, safetensors_bytes, weights_metadata  # heavy: torch; the hub stand-in stays light

    weights = Path(weights)
    meta = {k: v for k, v in weights_metadata(weights).items() if k != SEAL}
    weights.write_bytes(safetensors_bytes(load_file(str(weights)), meta))
    return weights
