"""The Hugging Face Hub, for models and datasets alike: whether a name is a hub id or a local path, a repo's files
from the hub or the offline cache (refusing pickles), uploads (create_repo + upload_folder), and the pieces of a
card (README.md with YAML metadata). Every hub failure is a one-line UserError naming the repo and what to do.

Offline (`HF_HUB_OFFLINE=1`) a repo resolves from the local cache (`HF_HUB_CACHE`, default
~/.cache/huggingface/hub) exactly as huggingface_hub lays it out: `{models,datasets}--owner--name/snapshots/<commit>`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError, one_line
from .io import looks_local

REPO_TYPES = ("model", "dataset")
# files that hold a pickle (torch.save, pickle, joblib): never downloaded from a repo we load, never loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN / pass a token)"


def is_repo_id(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """True when `name` can only mean a hub repo ('owner/name' or 'name', valid for the hub), not a local path."""
    from huggingface_hub.utils import validate_repo_id

    if not name or looks_local(name, file_suffixes):
        return False
    try:
        validate_repo_id(name)
    except Exception:
        return False
    return True


def offline() -> bool:
    """Whether huggingface_hub may not reach the network (HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def pickle_files(names: Iterable[str]) -> list[str]:
    """The names among `names` whose suffix marks a pickle (PICKLE_SUFFIXES), sorted."""
    return sorted(n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES)


def refuse_pickles(names: Iterable[str], where: str) -> None:
    """UserError when `names` (a repo's or folder's files) include a pickle: such a repo is not ours, or tampered."""
    found = pickle_files(names)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise UserError(f"{where} holds pickle files ({shown}), which this project never loads (they can run code): "
                        "it is not a golden-noise repo, or it was tampered with; use a repo of safetensors files")


def folder_files(folder: str | os.PathLike) -> list[str]:
    """Every file under `folder`, as a relative POSIX path (a hub snapshot's listing)."""
    root = Path(folder)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def snapshot(repo_id: str, repo_type: str = "model", revision: str | None = None, token: str | bool | None = None,
             allow_patterns: Sequence[str] | None = None, what: str | None = None) -> Path:
    """The local folder of a hub repo at `revision` (default main): downloaded, or from the cache when offline.

    A repo holding pickle files is refused, before any download when online (from its file list) and from the
    cached snapshot's listing when offline. `allow_patterns` limits what is downloaded; `what` names the flag or
    argument in errors."""
    from huggingface_hub import HfApi, snapshot_download

    check_repo_type(repo_type)
    what = what or f"{repo_type} repo"
    label = f"{what} {repo_id}" + (f" (revision {revision})" if revision else "")
    with _hub_errors(label, repo_type, revision):
        if not offline():
            refuse_pickles(HfApi(token=token).list_repo_files(repo_id, repo_type=repo_type, revision=revision),
                           f"hub {repo_type} repo {repo_id}")
        folder = Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token,
                                        allow_patterns=list(allow_patterns) if allow_patterns else None))
    refuse_pickles(folder_files(folder), f"hub {repo_type} repo {repo_id} ({folder})")
    return folder


class _hub_errors:
    """Turn huggingface_hub's errors inside the block into one-line UserErrors about `label`."""

    def __init__(self, label: str, repo_type: str = "model", revision: str | None = None):
        self.label, self.repo_type, self.revision = label, repo_type, revision

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, UserError) or not isinstance(exc, Exception):
            return False
        from huggingface_hub import errors as E

        label = self.label
        if isinstance(exc, E.RevisionNotFoundError):
            message = f"{label}: no such revision on the Hugging Face Hub: pass an existing branch, tag or commit"
        elif isinstance(exc, E.GatedRepoError):
            message = f"{label} is gated: accept its terms on the Hub and {LOGIN_HINT}"
        elif isinstance(exc, E.RepositoryNotFoundError):
            message = (f"{label}: no such {self.repo_type} repo on the Hugging Face Hub, or it is private "
                       f"({LOGIN_HINT}); a local path must exist")
        elif isinstance(exc, (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled)) or \
                type(exc).__name__ == "IncompleteSnapshotError":
            message = (f"{label} is neither a local path nor in the Hugging Face cache, and the hub cannot be reached"
                       f"{' (HF_HUB_OFFLINE=1)' if offline() else ''}: download it once with network access "
                       "(or unset HF_HUB_OFFLINE), or pass a local path")
        elif isinstance(exc, E.HfHubHTTPError) and getattr(getattr(exc, "response", None), "status_code", None) in (
                401, 403):
            message = f"{label}: the Hub refused the request ({one_line(exc)}); {LOGIN_HINT} with write access"
        else:
            message = f"{label}: {one_line(exc)}"
        raise UserError(message) from None


def check_repo_type(repo_type: str) -> None:
    if repo_type not in REPO_TYPES:
        raise ValueError(f"repo_type must be one of {REPO_TYPES}, got {repo_type!r}")


def check_repo_id(repo_id: str, flag: str) -> str:
    """`repo_id` if it is a valid hub repo id ('owner/name'), else a UserError naming `flag`."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise UserError(f"{flag} {repo_id!r} is not a Hugging Face repo id ({one_line(e)}): pass owner/name") \
            from None
    if "/" not in repo_id:
        raise UserError(f"{flag} {repo_id!r} names no owner: pass owner/name (your user or organisation name)")
    return repo_id


def check_can_push(repo_id: str, flag: str, token: str | None = None) -> None:
    """Refuse, before any work, a push that cannot happen: a bad repo id, offline mode, or no token."""
    from huggingface_hub import get_token

    check_repo_id(repo_id, flag)
    if offline():
        raise UserError(f"{flag} {repo_id}: HF_HUB_OFFLINE=1 forbids uploads: unset it, or drop {flag}")
    if not (token or get_token()):
        raise UserError(f"{flag} {repo_id} needs a Hugging Face token with write access: {LOGIN_HINT}")


def upload_folder(folder: str | os.PathLike, repo_id: str, repo_type: str = "model", token: str | None = None,
                  private: bool | None = None, revision: str | None = None, commit_message: str | None = None,
                  delete_patterns: Sequence[str] | None = None, what: str = "--push_to_hub") -> str:
    """Create the repo if needed (`private` only applies to a new repo) and upload every file of `folder` in one
    commit; files of the repo matching `delete_patterns` and not uploaded are removed in the same commit.
    Returns the commit's URL."""
    from huggingface_hub import HfApi

    check_repo_type(repo_type)
    check_repo_id(repo_id, what)
    if offline():
        raise UserError(f"{what} {repo_id}: HF_HUB_OFFLINE=1 forbids uploads: unset it to upload")
    api = HfApi(token=token)
    with _hub_errors(f"{what} {repo_id}", repo_type, revision):
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
                                 commit_message=commit_message or f"Upload {repo_type} with golden-noise-rnn",
                                 delete_patterns=list(delete_patterns) if delete_patterns else None)
    return str(getattr(info, "commit_url", None) or info)


def card_text(metadata: dict, body: str, repo_type: str = "model") -> str:
    """A card (the repo's README.md): YAML metadata as the Hub reads it (huggingface_hub's card data), then `body`.
    Keys whose value is None are left out."""
    from huggingface_hub import DatasetCardData, ModelCardData

    check_repo_type(repo_type)
    data = (ModelCardData if repo_type == "model" else DatasetCardData)(
        **{k: v for k, v in metadata.items() if v is not None})
    return f"---\n{data.to_yaml().strip()}\n---\n\n{body.strip()}\n"


def markdown_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    return "\n".join([cells(header), "|" + "|".join("---" for _ in header) + "|", *map(cells, rows)])
