"""NPNet's data recipe, measured: stage 2 scores each sample (--score_metric), records the rewards in the shards,
refuses a rerun with other scoring settings, loads the reward before it writes anything, and training keeps only
the samples whose gain reaches --min_reward_gain. On the tiny offline pipeline with a user reward from a temporary
file."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from golden_noise.dataset import format as F
from golden_noise.diffusion import encode_prompts, sample_images, seeded_noise
from golden_noise.golden import GoldenConfig, golden_step
from tests.conftest import dataset_samples
from tests.test_generate import SCRIPT, flip_byte, prompts_file, run_main, same_tree
from tests.test_training import ARCH, train_cli

REWARD = '''
import numpy as np


class Brightness:
    def __init__(self, path=None, batch_size=8):
        self.path = path

    def score(self, images, prompts):
        return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]
'''
N, STEPS, BATCH, SCORE_W, SCORE_STEPS = 10, 2, 4, 3.0, 2


@pytest.fixture(scope="module")
def reward_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "bright.py"
    path.write_text(REWARD, encoding="utf-8")
    return path


def score_flags(reward_file, w=SCORE_W, steps=SCORE_STEPS):
    return ["--score_metric", f"{reward_file}:Brightness", "--score_guidance_scale", w,
            "--score_num_inference_steps", steps]


def generate(capsys, pipe_dir, prompts, out, *extra):
    return run_main(capsys, SCRIPT, "--prompt_file", prompts, "--output_dir", out, "--base_model_id", pipe_dir,
                    "--num_steps", STEPS, "--batch_size", BATCH, "--device", "cpu", "--storage_dtype", "float32",
                    *extra)


@pytest.fixture(scope="module")
def scored(tiny_pipeline_dir, reward_file, tmp_path_factory):
    """A scored and an unscored dataset from the same prompts and settings."""
    root = tmp_path_factory.mktemp("scored")
    prompts = prompts_file(root, N)
    out = {}
    for name, extra in (("scored", score_flags(reward_file)), ("plain", [])):
        code, _, err = generate(_Quiet(), tiny_pipeline_dir, prompts, root / name, *extra)
        assert code == 0, err
        out[name] = root / name
    return {"root": root, "prompts": prompts, **out}


class _Quiet:
    """A stand-in for capsys in module fixtures (run_main only calls readouterr)."""

    def readouterr(self):
        class Out:
            out = err = ""
        return Out()


def metadata(root):
    """The samples in id order (dicts of their columns)."""
    samples = dataset_samples(root)
    return [samples[i] for i in sorted(samples)]


def test_scored_dataset_records_both_rewards_and_keeps_every_sample(scored, tiny_pipeline, reward_file):
    rows = metadata(scored["scored"])
    assert [int(r["id"]) for r in rows] == list(range(N))  # no sample dropped
    assert list(rows[0])[-3:] == ["reward_standard", "reward_golden", "reward_gain"]
    config = json.loads((scored["scored"] / F.RUN_CONFIG).read_text())
    assert config["scoring"] == {"metric": "Brightness", "reward": f"{reward_file}:Brightness", "reward_path": None,
                                 "guidance_scale": SCORE_W, "num_inference_steps": SCORE_STEPS,
                                 "images": ["x_T", "x'_n"]}
    assert "scoring" not in json.loads((scored["plain"] / F.RUN_CONFIG).read_text())
    assert "reward_gain" not in metadata(scored["plain"])[0]
    # the rewards are those of the images sampled from x_T and from x'_n (float32, as computed), batch by batch
    texts = scored["prompts"].read_text().splitlines()
    pipe = tiny_pipeline
    golden_cfg = GoldenConfig(**{k: config["golden"][k] for k in ("schedule_steps", "denoise_guidance_scale",
                                                                   "inversion_guidance_scale")})
    step = golden_step(pipe, golden_cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, N, BATCH):
            ids = list(range(start, min(N, start + BATCH)))
            batch = [texts[i] for i in ids]
            x_T = seeded_noise(ids, (4, 16, 16))
            x_n = step.sequence(x_T, encode_prompts(pipe, batch), STEPS)[:, -1]
            images = sample_images(pipe, batch + batch, torch.cat([x_T, x_n]), SCORE_STEPS, SCORE_W)
            bright = [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255) for im in images]
            for j, i in enumerate(ids):
                r = rows[i]
                assert r["reward_standard"] == bright[j]  # float64 columns: the reward's floats exactly
                assert r["reward_golden"] == bright[len(ids) + j]
                assert r["reward_gain"] == r["reward_golden"] - r["reward_standard"]
    finally:
        torch.set_num_threads(threads)
    gains = [float(r["reward_gain"]) for r in rows]
    assert any(g != 0 for g in gains)
    # scoring reads no random numbers: the dataset's tensors equal the unscored dataset's
    plain = metadata(scored["plain"])
    for i in range(N):
        for column in ("source", "golden", "text"):
            assert torch.equal(rows[i][column], plain[i][column]), (i, column)
    # the card reports the scores
    card = (scored["scored"] / "README.md").read_text()
    assert "| scores | Brightness of the image sampled from x_T" in card and "gain > 0 for" in card


def test_rerun_with_other_scoring_is_refused_and_a_damaged_scored_shard_is_remade(scored, tiny_pipeline_dir,
                                                                                 reward_file, tmp_path, capsys):
    import shutil

    work = tmp_path / "ds"
    shutil.copytree(scored["scored"], work)
    for extra, diff in ((score_flags(reward_file, w=1.0), "scoring"), ([], "scoring: {")):
        code, _, err = generate(capsys, tiny_pipeline_dir, scored["prompts"], work, *extra)
        assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and diff in err, err
        assert same_tree(work, scored["scored"])  # refused: nothing changed
    # a damaged shard is made again, its scores the same
    shard = work / "data/shard-00000.parquet"
    flip_byte(shard, shard.stat().st_size // 3)
    code, out, err = generate(capsys, tiny_pipeline_dir, scored["prompts"], work, *score_flags(reward_file))
    assert code == 0, err
    assert f"{N} generated" in out and "fails its sha256 check" in err
    assert same_tree(work, scored["scored"])


def test_score_flags_need_a_metric(tiny_pipeline_dir, tmp_path, capsys):
    code, _, err = generate(capsys, tiny_pipeline_dir, prompts_file(tmp_path, 2), tmp_path / "out",
                            "--score_guidance_scale", 2)
    assert code == 2 and "--score_guidance_scale set(s) how samples are scored: add --score_metric" in err
    code, _, err = generate(capsys, tiny_pipeline_dir, prompts_file(tmp_path, 2), tmp_path / "out",
                            "--score_metric", "nope")
    assert code == 2 and "unknown metric 'nope'" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / F.RUN_CONFIG).exists()


NEEDS_PATH = '''
from pathlib import Path


class NeedsWeights:
    def __init__(self, path=None, batch_size=8):
        if path is None or not Path(path).is_file():
            raise FileNotFoundError(f"no weights at {path}")

    def score(self, images, prompts):
        return [0.5 for _ in images]
'''


def test_a_bad_reward_path_fails_before_anything_is_written(tiny_pipeline_dir, tmp_path, capsys):
    """The reward is loaded (and its --score_reward_path checked) before run_config.json or any sample is written,
    so the corrected rerun is not refused as a rerun with other settings."""
    plugin = tmp_path / "needs.py"
    plugin.write_text(NEEDS_PATH, encoding="utf-8")
    prompts, out = prompts_file(tmp_path, 4), tmp_path / "out"
    flags = ["--score_metric", f"{plugin}:NeedsWeights", "--score_num_inference_steps", 1]
    code, _, err = generate(capsys, tiny_pipeline_dir, prompts, out, *flags, "--score_reward_path",
                            tmp_path / "missing.bin")
    assert code == 2 and "no weights at" in err.strip().splitlines()[-1]
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], [".lock"])
    (tmp_path / "weights.bin").write_bytes(b"w")
    code, stdout, err = generate(capsys, tiny_pipeline_dir, prompts, out, *flags, "--score_reward_path",
                                 tmp_path / "weights.bin")
    assert code == 0, err
    assert "4 complete samples" in stdout


def test_scoring_defaults_are_stage_5_sampling_defaults():
    from golden_noise.inference.config import SamplingConfig
    from golden_noise.scoring import ScoringConfig

    assert (ScoringConfig().score_guidance_scale, ScoringConfig().score_num_inference_steps) == \
        (SamplingConfig().guidance_scale, SamplingConfig().num_inference_steps)


def train(dataset, out, *extra):
    args = [*map(str, ARCH), "--dataloader_num_workers", "0", "--dataset_dir", str(dataset), "--output_dir",
            str(out), "--max_train_steps", "1", "--batch_size", "4", "--validation_fraction", "0.2",
            "--report_to", "none", *map(str, extra)]
    return train_cli.parse_args(args)


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)


def test_min_reward_gain_keeps_the_samples_whose_gain_reaches_it(scored, tmp_path, capsys, fresh_accelerate):
    from golden_noise.dataset.reader import split_ids
    from golden_noise.training.trainer import Trainer

    gains = {r["id"]: r["reward_gain"] for r in metadata(scored["scored"])}
    train_ids, val_ids = split_ids(sorted(gains), 0.2)
    threshold = sorted(gains[i] for i in train_ids)[len(train_ids) // 2]  # the median: about half are kept
    expected = sorted(i for i in train_ids if gains[i] >= threshold)
    assert 0 < len(expected) < len(train_ids)
    args = train(scored["scored"], tmp_path / "run", "--min_reward_gain", repr(threshold))
    trainer = Trainer(train_cli.dataclass_from_args(train_cli.TrainingConfig, args), args.arch).build()
    try:
        assert sorted(trainer.data.train.ids) == expected
        assert sorted(trainer.data.validation.ids) == val_ids  # validation is not filtered
    finally:
        trainer.close()
    logged = capsys.readouterr().err  # the trainer's log (setup_logging: INFO on stderr)
    assert f"--min_reward_gain {threshold:g} keeps {len(expected)} of {len(train_ids)} training samples" in logged
    # the whole CLI trains on them and records the threshold
    summary = train_cli.main(train(scored["scored"], tmp_path / "run2", "--min_reward_gain", repr(threshold)))
    assert summary["global_step"] == 1
    meta = json.loads((tmp_path / "run2" / "rnn_v3_model_final.json").read_text())
    assert meta["training"]["args"]["min_reward_gain"] == threshold


def test_min_reward_gain_errors_are_one_line(scored, tmp_path, capsys, fresh_accelerate):
    from golden_noise.runtime import run_cli

    for dataset, extra, message in (
            (scored["plain"], ["--min_reward_gain", 0], "--min_reward_gain needs reward scores, but "),
            (scored["scored"], ["--min_reward_gain", 10], "--min_reward_gain 10 keeps none of the 8 training samples")):
        argv = [str(a) for a in (*ARCH, "--dataloader_num_workers", 0, "--dataset_dir", dataset, "--output_dir",
                                 tmp_path / "run", "--max_train_steps", 1, "--report_to", "none",
                                 "--validation_fraction", 0.2, *extra)]
        assert run_cli(train_cli.main, train_cli.parse_args, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err
        assert not (tmp_path / "run" / "rnn_v3_model_final.safetensors").exists()
