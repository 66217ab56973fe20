"""The rules every CLI shares: one-line errors (a user error, running out of GPU memory, an empty message), exit
codes, list flags in both spellings, help texts that show each default once, and unwritable outputs refused before
any work, in every stage."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

from golden_noise.cli import HelpFormatter, add_dataclass_arguments, add_list_argument
from golden_noise.errors import UserError, one_line
from golden_noise.runtime import run_cli
from tests.conftest import ROOT

CLIS = ["scripts/extract_prompts.py", "scripts/generate_test_prompts.py", "src/generate_npd_series.py",
        "src/train_rnn_model_v3.py", "src/inference_rnn.py", "scripts/batch_inference.py", "scripts/evaluate_hps.py",
        "scripts/sweep.py", "scripts/build_toy_world.py", "scripts/measure_oracle_gain.py",
        "scripts/probe_text_embeddings.py", "scripts/quickstart_summary.py", "bench/bench_generation.py",
        "bench/bench_inference.py", "bench/bench_memory.py", "bench/bench_sweep.py", "bench/bench_training.py",
        "bench/gpu_check.py"]


def _parse(argv):
    return argparse.Namespace(argv=argv)


@pytest.mark.parametrize("raised, code, line", [
    (UserError("--prompt_file p.txt does not exist: pass an existing file"), 2,
     "error: --prompt_file p.txt does not exist: pass an existing file"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details"), 2,
     "error: out of GPU memory (OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB): use a smaller "
     "--batch_size, --dtype float16, or --enable_model_cpu_offload / --enable_vae_slicing where the stage has them"),
    (KeyboardInterrupt(), 130, "interrupted: finished work is kept; rerun the same command to resume"),
])
def test_run_cli_turns_failures_into_one_line(capsys, raised, code, line):
    def main(args):
        raise raised

    assert run_cli(main, _parse, []) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_one_line_never_fails_and_keeps_the_first_line():
    assert one_line(ValueError("")) == "ValueError"
    assert one_line(RuntimeError("\n\n  first\nsecond")) == "RuntimeError: first"
    assert one_line(UserError("plain")) == "plain"
    assert one_line("x" * 400, limit=20) == "x" * 17 + "..."


@dataclass
class _Config:
    steps: int = field(default=0, metadata={"help": "steps (0: off)"})
    rate: float = field(default=0.0, metadata={"help": "a rate"})
    name: str | None = field(default=None, metadata={"help": "a name"})
    blocks: list[int] = field(default_factory=lambda: [2, 2], metadata={"help": "blocks per stage"})
    flag: bool = field(default=False, metadata={"help": "a switch"})


def test_flags_from_a_dataclass_show_each_default_once_and_take_both_list_spellings():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_dataclass_arguments(p, _Config)
    add_list_argument(p, "--methods", choices=["standard", "gnsnet"], default=["standard"], help="methods")
    text = p.format_help()
    assert "steps (0: off) (default: 0)" in " ".join(text.split())  # a default of 0 is shown (0 == False)
    assert "a rate (default: 0.0)" in " ".join(text.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert p.parse_args(["--blocks", "2,2,2", "--methods", "standard,gnsnet"]).blocks == [2, 2, 2]
    assert p.parse_args(["--blocks", "3", "4"]).blocks == [3, 4]
    assert p.parse_args(["--methods", "gnsnet", "standard"]).methods == ["gnsnet", "standard"]
    with pytest.raises(SystemExit):
        p.parse_args(["--methods", "standard,golden"])


@pytest.mark.parametrize("script", CLIS)
def test_every_cli_help_shows_its_description_and_each_default_once(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the description is the docstring's whole first paragraph, not a line cut mid-sentence (6 were)
    description = " ".join(proc.stdout.split("\n\n")[1].split())
    assert description.endswith((".", ")")), description
    entries = re.split(r"\n  -|\n\n", proc.stdout)  # one entry per flag (group titles apart)
    assert len(entries) > 2
    doubled = [e for e in entries if e.count("(default") > 1]
    assert not doubled, doubled


@pytest.mark.parametrize("script, args", [
    ("src/train_rnn_model_v3.py", ["--dataset_dir", "{ds}"]),
    ("scripts/sweep.py", ["--prompt_file", "{prompts}", "--methods", "standard", "--metrics", "clipscore",
                          "--guidance_scales", "1", "--num_inference_steps", "2", "--base_model_id", "{ds}"]),
])
@pytest.mark.parametrize("where", ["/proc/golden_noise_test", "{file}/below"])
def test_unwritable_output_is_one_line_before_any_work(tmp_path, script, args, where):
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    flag = "--output_dir"
    out = where.format(file=tmp_path / "file")
    values = [a.format(ds=tmp_path / "no_such_dataset", prompts=tmp_path / "prompts.txt") for a in args]
    proc = subprocess.run([sys.executable, str(ROOT / script), *values, flag, out], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert out in lines[-1] and "writable" in lines[-1], lines[-1]
