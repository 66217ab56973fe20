"""Shared fixtures: a tiny SDXL-architecture pipeline built offline, and the two ways tests call a CLI script (in a
subprocess, or imported to call its parse_args/main in this process)."""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: thread overhead outweighs parallelism


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random StableDiffusionXLPipeline saved as a diffusers directory (latents 4x16x16, images 16 px)."""
    from golden_noise.testing.pipelines import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_pipeline_dir):
    """The tiny pipeline loaded through the project's own loader, on CPU in float32."""
    from golden_noise.diffusion import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir), dtype="float32", device="cpu")


def run_cli(script: str, *args, env: dict | None = None, check: bool = False, timeout: int = 600):
    """Run `python <repo>/<script> args...` and return the CompletedProcess (text stdout/stderr)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=str(ROOT))
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@functools.cache
def load_cli(relpath: str):
    """Import a CLI script as a module, to call its parse_args/main in this process (the scripts keep no state)."""
    spec = importlib.util.spec_from_file_location(Path(relpath).stem + "_cli", ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache that huggingface_hub (and subprocesses) read offline; fill it with
    golden_noise.testing.hub.cache_repo(hub_cache, "owner/name", files, repo_type="model" or "dataset")."""
    from golden_noise.testing.hub import use_offline_cache

    return use_offline_cache(monkeypatch, tmp_path / "hf-cache")


def dataset_samples(root: Path) -> dict[int, dict]:
    """Every sample of a finished sharded dataset, {id: {column: tensor or value}} (small test datasets only)."""
    import json

    from golden_noise.dataset.shards import ShardFile

    out = {}
    for record in json.loads((Path(root) / "index.json").read_text())["shards"]:
        shard = ShardFile(Path(root) / record["file"])
        for g in range(shard.num_row_groups):
            rows = shard.read_row_group(g, shard.file.schema_arrow.names)
            for j, sample_id in enumerate(rows["id"].tolist()):
                out[sample_id] = {k: torch.from_numpy(v[j].copy()) if v.ndim > 1 else v[j].item()
                                  if hasattr(v[j], "item") else v[j] for k, v in rows.items()}
    return out
