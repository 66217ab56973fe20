"""The shell scripts a user runs first: --help on every one of them (usage, exit 0, nothing touched), the install
step (the CPU-only torch wheels on request; nothing changes for GPU users), the two modes of the test command and
CI running the slow mode. Each script runs in a temporary copy of the repository with a stand-in `python` (and
`accelerate`) on PATH that records its arguments, so nothing here installs, downloads or trains."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

# every shell script of the repository, as git would list it (scripts/ and bench/)
SCRIPTS = sorted(str(p.relative_to(ROOT)) for folder in ("scripts", "bench") for p in (ROOT / folder).glob("*.sh"))
STAND_IN = """#!/usr/bin/env bash
# a stand-in for python / accelerate: records its arguments (one line, tab-separated); pip and pytest "succeed",
# anything else fails, so a script that gets past them stops at its first real command
{ printf '%s\\t' "$(basename "$0")" "$@"; printf '\\n'; } >> "$STAND_IN_LOG"
case "$1 $2" in "-m pip"|"-m pytest") exit 0 ;; esac
exit 1
"""


@pytest.fixture
def sandbox(tmp_path) -> dict:
    """A copy of the repository's scripts and the files they read, earlier outputs of a quickstart run in it (which
    a script that wrongly starts would delete), and a bin/ folder of stand-ins placed first on PATH."""
    repo = tmp_path / "repo"
    for folder in ("scripts", "bench", ".ci"):
        shutil.copytree(ROOT / folder, repo / folder)
    for name in ("requirements.txt", "requirements-reference.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    for folder in ("data", "output", "inference_output", "results"):
        (repo / folder / "quickstart").mkdir(parents=True)
        (repo / folder / "quickstart" / "earlier_run.txt").write_text("keep me")
    (repo / "worlds" / "toy_shapes").mkdir(parents=True)
    (repo / "worlds" / "toy_shapes" / "model_index.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3", "accelerate"):
        (bin_dir / name).write_text(STAND_IN)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("SKIP_INSTALL", "PYTHON", "CPU_ONLY", "TORCH_INDEX_URL")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", STAND_IN_LOG=str(log))
    return {"repo": repo, "env": env, "log": log}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under `folder`: its bytes (None for a folder) and modification time."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def calls(sandbox: dict) -> list[list[str]]:
    return [line.rstrip("\t").split("\t") for line in sandbox["log"].read_text().splitlines()]


def run(sandbox: dict, script: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], cwd=sandbox["repo"], env={**sandbox["env"], **(env or {})},
                          capture_output=True, text=True, timeout=60)


def test_the_repository_has_the_scripts_the_issue_names():
    assert {"scripts/quickstart.sh", "scripts/sweep_toy.sh", "scripts/train.sh", "scripts/inference.sh",
            "scripts/evaluate.sh", "scripts/evalute.sh", "scripts/test.sh", "scripts/install.sh",
            "bench/gpu_check.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_touches_nothing(sandbox, script, flag):
    """`bash SCRIPT --help` (also after other arguments) prints the usage once and exits 0: no install, no run, no
    deleted or written file, no python started. (Before: quickstart.sh deleted the earlier outputs and started a
    run, sweep_toy.sh printed sweep.py's help 4 times and "total: 10s", train.sh started training and left a .lock.)"""
    before = snapshot(sandbox["repo"])
    for args in ([flag], ["--all", flag] if script == "scripts/test.sh" else ["--no_progress", flag]):
        proc = run(sandbox, script, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("Usage:") == 1 and proc.stderr == ""
        name = "evaluate.sh" if script.endswith("evalute.sh") else Path(script).name  # evalute.sh runs evaluate.sh
        assert name in proc.stdout, proc.stdout
        assert "total:" not in proc.stdout and not proc.stdout.lstrip().startswith("#")
    assert calls(sandbox) == []  # neither python nor accelerate was started
    assert snapshot(sandbox["repo"]) == before


def test_install_default_is_pypi_as_before(sandbox):
    """Without CPU_ONLY nothing changes for GPU users: requirements.txt from PyPI, then the project."""
    proc = run(sandbox, "scripts/install.sh")
    assert proc.returncode == 0, proc.stderr
    assert calls(sandbox) == [["python", "-m", "pip", "install", "-q", "-r", "requirements.txt"],
                              ["python", "-m", "pip", "install", "-q", "--no-deps", "-e", "."]]
    assert "download.pytorch.org" not in proc.stdout + proc.stderr


def _torch_specs() -> list[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [re.sub(r"\s+", "", line.split("#")[0]) for line in lines if re.match(r"torch(vision)?[<>=!~]", line)]


def test_cpu_only_installs_torch_from_the_cpu_index_first(sandbox):
    """CPU_ONLY=1: torch and torchvision, in the version ranges requirements.txt gives them, from PyTorch's CPU-only
    index before requirements.txt (which then finds them installed); TORCH_INDEX_URL picks another index. Tested
    with the stand-in python: download.pytorch.org is not reachable from the test machine."""
    specs = _torch_specs()
    assert specs == ["torch>=2.4,<=2.14.1", "torchvision>=0.19"]
    proc = run(sandbox, "scripts/install.sh", "--tests", env={"CPU_ONLY": "1"})
    assert proc.returncode == 0, proc.stderr
    assert calls(sandbox) == [
        ["python", "-m", "pip", "install", "-q", "--index-url", "https://download.pytorch.org/whl/cpu", *specs],
        ["python", "-m", "pip", "install", "-q", "-r", "requirements.txt"],
        ["python", "-m", "pip", "install", "-q", "--no-deps", "-r", "requirements-reference.txt"],
        ["python", "-m", "pip", "install", "-q", "--no-deps", "-e", "."]]
    sandbox["log"].write_text("")
    proc = run(sandbox, "scripts/install.sh", env={"TORCH_INDEX_URL": "file:///mirror/cpu"})
    assert proc.returncode == 0 and calls(sandbox)[0][5:7] == ["--index-url", "file:///mirror/cpu"]
    proc = run(sandbox, "scripts/install.sh", "--cpu")
    assert proc.returncode == 2 and "unknown argument '--cpu'" in proc.stderr


def test_quickstart_installs_through_the_install_script(sandbox):
    """The quickstart's install step is scripts/install.sh (so CPU_ONLY=1 works there too); SKIP_INSTALL skips it."""
    proc = run(sandbox, "scripts/quickstart.sh", env={"CPU_ONLY": "1"})
    assert proc.returncode != 0  # the stand-in python fails the first stage: no run happens here
    assert [c[:6] for c in calls(sandbox)[:3]] == [
        ["python", "-m", "pip", "install", "-q", "--index-url"], ["python", "-m", "pip", "install", "-q", "-r"],
        ["python", "-m", "pip", "install", "-q", "--no-deps"]]
    assert calls(sandbox)[3][1] == "scripts/extract_prompts.py"
    sandbox["log"].write_text("")
    run(sandbox, "scripts/quickstart.sh", env={"SKIP_INSTALL": "1"})
    assert calls(sandbox)[0][1] == "scripts/extract_prompts.py"


def test_the_fast_and_the_ci_modes_of_the_test_command(sandbox):
    """`bash scripts/test.sh` runs the tests not marked slow; `--all` (CI: .ci/run) runs every test; other arguments
    reach pytest; every test and the processes it starts get one CPU thread."""
    proc = run(sandbox, "scripts/test.sh", env={"SKIP_INSTALL": "1"})
    assert proc.returncode == 0 and calls(sandbox) == [["python", "-m", "pytest", "-q", "--durations=15", "-m",
                                                                   "not slow"]]
    sandbox["log"].write_text("")
    proc = run(sandbox, "scripts/test.sh", "--all", "-x", "tests/test_cli.py", env={"SKIP_INSTALL": "1"})
    assert proc.returncode == 0 and calls(sandbox) == [["python", "-m", "pytest", "-q", "--durations=15", "-x",
                                                                   "tests/test_cli.py"]]
    sandbox["log"].write_text("")
    proc = subprocess.run(["bash", ".ci/run"], cwd=sandbox["repo"], env=sandbox["env"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [c[:4] for c in calls(sandbox)][-1] == ["python", "-m", "pytest", "-q"]
    assert "-m" not in calls(sandbox)[-1][2:]  # CI runs the slow tests too
    assert any("requirements-reference.txt" in c for c in calls(sandbox))  # CI installs first
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert 'OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"' in script


def test_readme_shows_both_test_modes_and_ci_runs_the_slow_one():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh --all" in readme and "bash scripts/test.sh " in readme
    assert (ROOT / ".ci" / "run").read_text().strip().endswith("bash scripts/test.sh --all")
