"""Shared fixtures: a tiny SDXL-architecture pipeline built offline, the two ways tests call a CLI script (in a
subprocess, or imported to call its parse_args/main in this process), and the progress lines of slow tests."""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one CPU thread in this process and in every process a test starts: on cores other jobs keep busy, two OpenMP
# threads stall each other (a world build went from 6 to over 30 minutes), so the times do not depend on the load
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def progress(request):
    """say(message): a line on the terminal at once, while the test runs (pytest's output capture does not hold it
    back), prefixed with the test's name and its seconds so far: slow tests report where they are."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    start = time.monotonic()

    def say(message: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\n    [{request.node.name} {time.monotonic() - start:5.0f}s] {message}", end="", flush=True)

    return say


def idle_threads(most: int) -> int:
    """Threads for a long CPU job a test starts: as many cores as no other job keeps busy (the 1-minute load average
    less the one core the test run itself keeps busy, with a quarter core of slack), between 1 and `most`."""
    others = max(0.0, os.getloadavg()[0] - 1)
    return max(1, min(most, int((os.cpu_count() or 1) - others + 0.25)))


_BAR = re.compile(r"^\s*([^:|]{1,60}):\s*\d+%\|")  # a tqdm bar: "train UNet:  45%|####  | 675/1500 [...]"


def run_with_progress(command: list, say, timeout: int, env: dict | None = None,
                      every: float = 60.0) -> subprocess.CompletedProcess:
    """Run `command` (cwd: the repository) with stdout and stderr in one stream, and relay its progress through
    `say` (the `progress` fixture) while it runs: each step line (`=== ...`, as the quickstart prints them) and each
    progress bar that starts a new phase at once, and the latest line every `every` seconds. Returns the
    CompletedProcess (its stdout holds both streams, stderr is empty)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
                            cwd=str(ROOT))
    chunks, last, state = [], [""], {"phase": None}

    def read():
        for raw in iter(lambda: proc.stdout.read1(65536), b""):
            text = raw.decode("utf-8", errors="replace")
            chunks.append(text)
            for line in (part.strip() for part in re.split(r"[\r\n]+", text)):
                if not line:
                    continue
                last[0] = line
                bar = _BAR.match(line)
                if line.startswith("==="):
                    say(line)
                elif bar and bar.group(1) != state["phase"]:
                    state["phase"] = bar.group(1)
                    say(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline, next_beat = time.monotonic() + timeout, time.monotonic() + every
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            reader.join(10)
            raise subprocess.TimeoutExpired(command, timeout, output="".join(chunks))
        if time.monotonic() > next_beat:
            say(f"... {last[0][:150]}")
            next_beat += every
        time.sleep(0.5)
    reader.join(30)
    return subprocess.CompletedProcess(command, proc.returncode, "".join(chunks), "")


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
