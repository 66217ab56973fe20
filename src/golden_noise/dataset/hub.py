"""Sharded datasets on the Hugging Face Hub: training from a hub dataset id (`resolve_dataset`) and pushing a
dataset with its card (`push_dataset`). Every hub failure is a one-line UserError naming the repo and what to do.

A hub id's files (run_config.json, index.json, the card and the shards) are fetched into the Hugging Face cache
(`snapshot_download`: resumable, shared with huggingface_hub and datasets) and read from there like a local
folder; with HF_HUB_OFFLINE=1 they must be in the cache already. Fetching whole shards rather than reading byte
ranges over HTTP is deliberate: training verifies every shard's sha256 before the first step and its seeded global
shuffle touches every shard in the first steps, so a lazy reader would move the same bytes with far more requests.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UserError, one_line
from ..io import looks_local
from ..runtime import get_logger
from . import format as F

logger = get_logger(__name__)
LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN, or pass --token)"
CARD = "README.md"
PATTERNS = (F.RUN_CONFIG, F.INDEX, CARD, f"{F.DATA}/*.parquet")  # what a dataset repo holds


def is_hub_id(name: str | os.PathLike) -> bool:
    """True when `name` can only mean a hub repo ('owner/name'), not a local path."""
    from huggingface_hub.utils import validate_repo_id

    name = str(name)
    if looks_local(name) or "/" not in name:
        return False
    try:
        validate_repo_id(name)
    except Exception:
        return False
    return True


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_error(label: str, exc: Exception) -> UserError:
    """A one-line UserError about `label` for a huggingface_hub failure."""
    from huggingface_hub import errors as E

    if isinstance(exc, E.RevisionNotFoundError):
        return UserError(f"{label}: no such revision on the Hugging Face Hub: pass an existing branch, tag or commit")
    if isinstance(exc, E.RepositoryNotFoundError):
        return UserError(f"{label}: no such dataset repo on the Hugging Face Hub, or it is private ({LOGIN_HINT}); a "
                         "local path must exist")
    if isinstance(exc, (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled)):
        return UserError(f"{label} is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
                         f"reached{' (HF_HUB_OFFLINE=1)' if _offline() else ''}: download it once with network access "
                         "(or unset HF_HUB_OFFLINE), or pass a local folder")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, E.HfHubHTTPError) and status in (401, 403):
        return UserError(f"{label}: the Hub refused the request ({one_line(exc)}); {LOGIN_HINT} with write access")
    return UserError(f"{label}: {one_line(exc)}")


def resolve_dataset(name: str | os.PathLike, revision: str | None = None) -> Path:
    """The local folder of a dataset: `name` itself when it is a path, else the hub dataset repo's snapshot in the
    Hugging Face cache (fetched when online)."""
    if not is_hub_id(name):
        return Path(name)
    from huggingface_hub import snapshot_download

    label = f"--dataset_dir {name}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(snapshot_download(str(name), repo_type="dataset", revision=revision,
                                        allow_patterns=list(PATTERNS)))
    except UserError:
        raise
    except Exception as e:
        raise _hub_error(label, e) from None
    if not (folder / F.RUN_CONFIG).is_file():
        raise UserError(f"{label}: the repo has no {F.RUN_CONFIG}: it is not a golden-noise sequence dataset (push "
                        "one with scripts/push_dataset.py)")
    logger.info("--dataset_dir %s: the hub dataset's files in %s", name, folder)
    return folder


def check_pushable(repo_id: str, token: str | None = None) -> None:
    """Refuse, before any work, a push that cannot happen: a bad repo id, offline mode, or no token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise UserError(f"REPO_ID {repo_id!r} is not a Hugging Face repo id ({one_line(e)}): pass owner/name") \
            from None
    if "/" not in repo_id:
        raise UserError(f"REPO_ID {repo_id!r} names no owner: pass owner/name (your user or organisation name)")
    if _offline():
        raise UserError(f"pushing to {repo_id}: HF_HUB_OFFLINE=1 forbids uploads: unset it")
    if not (token or get_token()):
        raise UserError(f"pushing to {repo_id} needs a Hugging Face token with write access: {LOGIN_HINT}")


def push_dataset(dataset_dir: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                 prompt_source: str | None = None, commit_message: str | None = None) -> dict:
    """Upload a finished sharded dataset to the hub dataset repo `repo_id` (created if needed): run_config.json,
    index.json, the shards (each checked against its sha256 first) and a dataset card naming the repo. Returns
    {url, files, bytes}."""
    from huggingface_hub import HfApi

    from .card import dataset_card
    from .reader import load_run_config, read_shard_index
    from .writer import verify_shards

    check_pushable(repo_id, token)
    root = Path(dataset_dir)
    run_config = load_run_config(root)
    if run_config.get("format_version", F.LOOSE_FORMAT_VERSION) != F.FORMAT_VERSION:
        raise UserError(f"{root} is a format-1 dataset (loose files): convert it with scripts/convert_dataset.py "
                        "first, then push the sharded copy")
    index = read_shard_index(root, run_config)
    bad = verify_shards(root, index["shards"])
    if bad:
        record, why = bad[0]
        raise UserError(f"{root / record['file']} {why}: rerun generate_npd_series.py with the dataset's flags to "
                        "remake it, then push")
    card = dataset_card(root, run_config, index, repo_id=repo_id, prompt_source=prompt_source)
    api = HfApi(token=token)
    label = f"dataset repo {repo_id}"
    with tempfile.TemporaryDirectory() as tmp:  # the upload: links to the dataset's files and the card for the repo
        stage = Path(tmp)
        files = [F.RUN_CONFIG, F.INDEX, *[r["file"] for r in index["shards"]]]
        for rel in files:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).symlink_to((root / rel).resolve())
        (stage / CARD).write_text(card, encoding="utf-8")
        try:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(stage),
                                     commit_message=commit_message or f"golden-noise dataset: {index['num_samples']} "
                                                                      f"samples in {index['num_shards']} shards",
                                     delete_patterns=[f"{F.DATA}/*.parquet"])
        except UserError:
            raise
        except Exception as e:
            raise _hub_error(label, e) from None
    return {"url": getattr(info, "commit_url", str(info)), "files": [*files, CARD],
            "bytes": index["bytes"], "samples": index["num_samples"]}
