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

from golden_noise.cli import (SEED_RULES, HelpFormatter, add_dataclass_arguments, add_list_argument, check_fields,
                              rerun_fields, rerun_keys, setting)
from golden_noise.cli import parser as cli_parser
from golden_noise.errors import UserError, one_line
from golden_noise.runtime import run_cli
from tests.conftest import ROOT

CLIS = ["scripts/extract_prompts.py", "scripts/generate_test_prompts.py", "src/generate_npd_series.py",
        "src/train_rnn_model_v3.py", "src/inference_rnn.py", "scripts/batch_inference.py", "scripts/evaluate_hps.py",
        "scripts/sweep.py", "scripts/build_toy_world.py", "scripts/measure_oracle_gain.py",
        "scripts/probe_text_embeddings.py", "scripts/quickstart_summary.py", "scripts/push_model.py",
        "bench/bench_generation.py", "bench/bench_inference.py", "bench/bench_memory.py", "bench/bench_sweep.py",
        "bench/bench_training.py", "bench/gpu_check.py"]


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


# ---------------------------------------------------------------- the flags of each stage stay the same
FLAG_CLIS = ["src/generate_npd_series.py", "src/train_rnn_model_v3.py", "src/inference_rnn.py",
             "scripts/batch_inference.py", "scripts/evaluate_hps.py", "scripts/sweep.py",
             "scripts/measure_oracle_gain.py"]
FLAG_BASELINE = ROOT / "tests" / "data" / "cli_flags.json"


class _Parsed(Exception):
    """Raised in place of parsing, carrying the parser a CLI built."""


def cli_flags(script: str) -> dict:
    """{'--flag [--no-flag]': default} of a CLI's parser (defaults as JSON: tuples as lists, other objects as str)."""
    import json

    from tests.conftest import load_cli

    def grab(self, *args, **kwargs):
        raise _Parsed(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        load_cli(script).parse_args([])
    except _Parsed as e:
        p = e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    out = {}
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = list(action.default) if isinstance(action.default, tuple) else action.default
        try:
            json.dumps(default)
        except TypeError:
            default = str(default)
        out[" ".join(sorted(action.option_strings))] = default
    return out


@pytest.mark.parametrize("script", FLAG_CLIS)
def test_flags_and_defaults_are_those_recorded(script):
    """Generating a stage's flags from dataclasses keeps its flags and defaults: tests/data/cli_flags.json holds
    them as they were written by hand (a flag added on purpose is added there too)."""
    import json

    recorded = json.loads(FLAG_BASELINE.read_text())[script]
    now = cli_flags(script)
    assert sorted(now) == sorted(recorded)
    assert {k: v for k, v in now.items() if recorded[k] != v} == {}, {k: recorded[k] for k in now if recorded[k] != now[k]}


# ---------------------------------------------------------------- a setting's rules, written once in its field
@dataclass
class _Nested:
    steps: int = setting(30, "steps", min=1, rerun=True)
    scale: float = setting(5.5, "a scale", min=0, rerun=True, loaded="scale_used")
    size: int | None = setting(None, "a size", loaded=("size_used", "shape"))


@dataclass
class _Job:
    path: str = setting(rerun="path_fingerprint")
    fraction: float = setting(0.1, "a fraction", min=0, below=1)
    rate: float = setting(1e-4, "a rate", above=0)
    beta: float = setting(0.9, "a beta", min=0, below=1)
    seed: int = setting(0, "a seed", **SEED_RULES, rerun=("seed", "seed_stride"))
    scales: list[float] = setting(default_factory=lambda: [1.0], help="scales", min=0)
    kind: str = setting("a", "a kind", choices=("a", "b"))
    model: str | None = setting(None, "a model", rerun="model_sha256", when_unused=("model_sha256", "model_file"))
    nested: _Nested = setting(default_factory=_Nested)


def _job_parser():
    p = cli_parser("test")
    add_dataclass_arguments(p, _Job, exclude=("nested",))
    add_dataclass_arguments(p, _Nested)
    return p


@pytest.mark.parametrize("argv, line", [
    (["--fraction", "1"], "error: --fraction must be in [0, 1), got 1.0"),
    (["--fraction", "-0.5"], "error: --fraction must be in [0, 1), got -0.5"),
    (["--rate", "0"], "error: --rate must be positive, got 0.0"),
    (["--beta", "1.5"], "error: --beta must be in [0, 1), got 1.5"),
    (["--seed", "-1"], f"error: --seed must be in [0, {2 ** 63 - 1}], got -1"),
    (["--seed", str(2 ** 63)], f"error: --seed must be in [0, {2 ** 63 - 1}], got {2 ** 63}"),
    (["--scales", "1", "-2"], "error: --scales must not be negative, got -2.0"),
    (["--steps", "0"], "error: --steps must be at least 1, got 0"),
    (["--scale", "nan"], "error: argument --scale: must be a finite number, got nan"),
    (["--rate", "inf"], "error: argument --rate: must be a finite number, got inf"),
    (["--scales", "1,-inf"], "error: --scales: must be a finite number, got -inf"),
    (["--kind", "c"], "error: argument --kind: invalid choice: 'c' (choose from 'a', 'b')"),
    (["--path"], "error: argument --path: expected one argument"),
])
def test_a_fields_rules_refuse_a_flag_in_one_line(argv, line, capsys):
    """A field's range (min/max inclusive, above/below exclusive), choices and the finite rule of floats refuse a
    bad flag after parsing: one line, exit 2."""
    p = _job_parser()
    assert p.parse_args(["--path", "p", "--fraction", "0", "--rate", "1e-9", "--seed", str(2 ** 63 - 1), "--scales",
                         "0"]).seed == 2 ** 63 - 1
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--path", "p", *argv])
    assert e.value.code == 2 and capsys.readouterr().err.splitlines() == [line]


def test_a_field_without_default_is_a_required_flag(capsys):
    with pytest.raises(SystemExit):
        _job_parser().parse_args([])
    assert capsys.readouterr().err.splitlines() == ["error: the following arguments are required: --path"]


def test_a_fields_rules_refuse_a_value_set_in_code():
    """check_fields applies the same rules to a dataclass built in code (nested ones too), naming the flag."""
    check_fields(_Job("p"))
    for job, line in [(_Job("p", beta=1.0), "--beta must be in [0, 1), got 1.0"),
                      (_Job("p", rate=float("nan")), "--rate must be a finite number, got nan"),
                      (_Job("p", scales=[1.0, float("inf")]), "--scales must be a finite number, got inf"),
                      (_Job("p", kind="c"), "--kind must be one of a, b, got c"),
                      (_Job("p", nested=_Nested(steps=0)), "--steps must be at least 1, got 0")]:
        with pytest.raises(UserError) as e:
            check_fields(job)
        assert str(e.value) == line


def test_golden_and_scoring_configs_own_their_ranges():
    from golden_noise.golden import GoldenConfig
    from golden_noise.scoring import ScoringConfig

    assert GoldenConfig().check() == GoldenConfig()
    for config, line in [(GoldenConfig(schedule_steps=0), "--schedule_steps must be at least 1, got 0"),
                         (GoldenConfig(denoise_guidance_scale=float("nan")),
                          "--denoise_guidance_scale must be a finite number, got nan"),
                         (GoldenConfig(inversion_guidance_scale=-1.0),
                          "--inversion_guidance_scale must not be negative, got -1.0"),
                         (ScoringConfig("brightness", score_guidance_scale=float("inf")),
                          "--score_guidance_scale must be a finite number, got inf"),
                         (ScoringConfig("brightness", score_batch_size=0), "--score_batch_size must be at least 1, got 0")]:
        with pytest.raises(UserError) as e:
            config.check()
        assert str(e.value) == line


def test_rerun_keys_are_derived_from_field_metadata():
    """The keys a rerun must keep come from the fields' `rerun` / `loaded` / `when_unused` metadata (nested
    dataclasses included, in field order), so a new byte-shaping setting is declared once, in its field."""
    from golden_noise.inference import batch
    from golden_noise.sweep import job as sweep

    assert rerun_keys(_Job) == ("path_fingerprint", "seed", "seed_stride", "model_sha256", "steps", "scale")
    assert rerun_keys(_Job, "loaded") == ("scale_used", "size_used", "shape")
    assert rerun_keys(_Job, "when_unused") == ("model_sha256", "model_file")
    assert rerun_keys(_Job, exclude=("scale",)) == ("path_fingerprint", "seed", "seed_stride", "model_sha256", "steps")
    assert rerun_fields(_Nested) == ("steps", "scale")
    # stage 5 keeps every sampling setting; the sweep sets guidance and steps per cell, so its rerun keeps neither
    assert {"batch_size", "guidance_scale", "num_inference_steps", "base_model_id_used", "golden"} <= set(
        batch.EARLY_KEYS)
    assert {"batch_size", "seed_stride", "scheduler", "base_model_id_used", "golden"} <= set(sweep.EARLY_KEYS)
    assert not {"guidance_scale", "num_inference_steps"} & set(sweep.EARLY_KEYS)
    assert set(batch.LOADED_KEYS) == set(sweep.LOADED_KEYS) == {"height_used", "width_used", "latent_shape",
                                                                 "pipeline_class", "scheduler_class"}


# what each CLI needs to parse at all (the values are never used: parsing stops at the bad flag)
REQUIRED = {"src/generate_npd_series.py": ["--prompt_file", "p.txt"], "src/inference_rnn.py": [
    "--rnn_weights_path", "r", "--prompt", "p"], "scripts/batch_inference.py": ["--prompt_file", "p.txt"],
    "scripts/evaluate_hps.py": ["--prompt_file", "p.txt"], "scripts/sweep.py": ["--prompt_file", "p.txt"],
    "scripts/measure_oracle_gain.py": ["--world", "w"]}


def _float_flags(script: str) -> list[str]:
    from golden_noise.cli import finite_float

    def grab(self, *args, **kwargs):
        raise _Parsed(self)

    from tests.conftest import load_cli

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = grab
    try:
        load_cli(script).parse_args([])
    except _Parsed as e:
        p = e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = original
    return [a.option_strings[0] for a in p._actions if float in (a.type, getattr(a, "item_type", None))
            or finite_float in (a.type, getattr(a, "item_type", None))]


@pytest.mark.parametrize("script", FLAG_CLIS)
def test_every_float_flag_refuses_nan_and_inf(script, capsys):
    """Every float flag of every stage (a field's or hand-written) refuses NaN and infinities: one line, exit 2."""
    from tests.conftest import load_cli

    flags = _float_flags(script)
    assert flags or script == "scripts/evaluate_hps.py", "no float flag found"
    for flag in flags:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit) as e:
                load_cli(script).parse_args([*REQUIRED.get(script, []), f"{flag}={bad}"])
            err = capsys.readouterr().err.splitlines()
            assert e.value.code == 2 and len(err) == 1 and flag in err[0] and "finite" in err[0], (flag, err)


# ---------------------------------------------------------------- seeds stay within torch's 64-bit range
SEED_MAX = 2 ** 63 - 1


@pytest.mark.parametrize("script, argv, line", [
    ("src/inference_rnn.py", ["--rnn_weights_path", "r", "--prompt", "p", "--seed", str(2 ** 63)],
     f"error: --seed must be in [0, {SEED_MAX}], got {2 ** 63}"),
    ("src/inference_rnn.py", ["--rnn_weights_path", "r", "--prompt", "p", "--seed", "-1"],
     f"error: --seed must be in [0, {SEED_MAX}], got -1"),
    ("scripts/batch_inference.py", ["--prompt_file", "p.txt", "--start_seed", str(2 ** 64)],
     f"error: --start_seed must be in [0, {SEED_MAX}], got {2 ** 64}"),
    ("scripts/sweep.py", ["--prompt_file", "p.txt", "--start_seed", str(2 ** 63)],
     f"error: --start_seed must be in [0, {SEED_MAX}], got {2 ** 63}"),
    ("scripts/evaluate_hps.py", ["--prompt_file", "p.txt", "--seed", "-1"],
     f"error: --seed must be in [0, {SEED_MAX}], got -1"),
])
def test_a_seed_past_the_64_bit_range_is_a_one_line_error(script, argv, line, capsys):
    from golden_noise.runtime import run_cli as run_main
    from tests.conftest import load_cli

    cli = load_cli(script)
    assert run_main(cli.main, cli.parse_args, argv) == 2
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize("script, argv, last", [
    ("scripts/batch_inference.py", ["--methods", "standard", "--start_seed", SEED_MAX - 2, "--output_base_dir"],
     "the last prompt index 3"),
    ("scripts/sweep.py", ["--methods", "standard", "best_of_2", "--metrics", "clipscore", "--guidance_scales", 1,
                          "--start_seed", SEED_MAX - 1_000_000, "--output_dir"],
     "the largest seed offset (prompt index + k x 1,000,000 for best_of_K's candidate k) 1000003"),
])
def test_the_last_seed_past_the_64_bit_range_is_refused_before_any_work(script, argv, last, tmp_path, capsys):
    """start_seed + the last prompt index (+ best_of_K's candidate offset in the sweep) past 2**63 - 1: one line
    naming --start_seed, before any model loads or any file is written."""
    from golden_noise.runtime import run_cli as run_main
    from tests.conftest import load_cli

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n\nb\nc\n")  # indices 0, 2, 3
    cli = load_cli(script)
    out = tmp_path / "out"
    args = ["--prompt_file", prompts, "--base_model_id", tmp_path / "no_model", "--device", "cpu", *argv, out]
    assert run_main(cli.main, cli.parse_args, [str(a) for a in args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: --start_seed ") and f"+ {last} = " in err[0], err
    assert "is past the largest seed, 2**63 - 1" in err[0] and not out.exists()
