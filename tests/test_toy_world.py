"""The toy world: procedural scenes, the deterministic builder, the pipeline it saves, its reward and the
oracle-gain measurement."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from golden_noise.errors import UserError
from golden_noise_toy import build_world
from golden_noise_toy.build import PRESETS
from golden_noise_toy.grammar import WorldSpec, parse_prompt
from golden_noise_toy.render import render, sample_scenes
from tests.conftest import idle_threads, run_cli, run_with_progress

SPEC = PRESETS["test"].spec          # 2 colours x 2 shapes x 2 sizes x 2 positions = 16 captions
SPEC_DEFAULT = PRESETS["small"].spec  # the default world's: 6 x 4 x 3 x 4 = 288 captions


@pytest.fixture(scope="module")
def test_world(tmp_path_factory) -> Path:
    """The `test` preset built once (seconds)."""
    out = tmp_path_factory.mktemp("toy") / "world"
    build_world(out, "test", seed=0, quiet=True)
    return out


def _weights(world: Path) -> dict[str, bytes]:
    return {str(p.relative_to(world)): p.read_bytes() for p in sorted(world.rglob("*.safetensors"))}


def test_parse_prompt_reads_the_grammar():
    attrs = WorldSpec().attributes
    assert parse_prompt("a small red circle at the top left", attrs) == {"color": 0, "shape": 0, "size": 0,
                                                                         "position": 0}
    assert parse_prompt("A LARGE Blue cross, bottom right please", attrs) == {"color": 4, "shape": 3, "size": 2,
                                                                              "position": 3}
    assert parse_prompt("a red thing", attrs) == {"color": 0}           # unnamed attributes are left out
    assert parse_prompt("a red or blue square", attrs) == {"shape": 1}  # ambiguous ones too
    assert parse_prompt("reddish squares on top", attrs) == {}          # whole words and phrases only


def test_render_is_deterministic_and_draws_the_attributes():
    spec = WorldSpec()
    a = sample_scenes(spec, 256, torch.Generator().manual_seed(3))
    b = sample_scenes(spec, 256, torch.Generator().manual_seed(3))
    ia, ib = render(spec, a), render(spec, b)
    assert ia.shape == (256, 3, 32, 32) and torch.equal(ia, ib)
    assert 0 <= ia.min() and ia.max() <= 1
    assert len(spec.all_captions()) == 6 * 4 * 3 * 4 == len(set(spec.all_captions()))
    # each caption names the scene's labels
    attrs = spec.attributes
    for caption, row in zip(a.captions(spec), a.labels.tolist()):
        assert parse_prompt(caption, attrs) == dict(zip(attrs, row))
    # the pixel at each shape's centre has the shape's colour; a corner shows the background
    cx, cy = a.center[:, 0].long(), a.center[:, 1].long()
    centre = ia[torch.arange(256), :, cy, cx]  # (N, 3)
    assert torch.allclose(centre, a.rgb, atol=0.02)
    assert torch.allclose(ia[:, :, 0, 0], torch.full((256, 3), spec.background), atol=1e-6)
    # larger size classes cover more pixels; the shape's bounding box is centred in the named half of each axis
    mask = (ia - spec.background).abs().sum(1).gt(0.05)  # (N, H, W)
    area = mask.float().sum((1, 2))
    size, position = a.labels[:, 2], a.labels[:, 3]
    assert area[size == 2].mean() > 3 * area[size == 0].mean()
    sides = torch.tensor(list(spec.positions.values()))[position]  # (N, 2) column, row half
    for covered, side in ((mask.any(1), sides[:, 0]), (mask.any(2), sides[:, 1])):  # (N, W), (N, H)
        idx = torch.arange(32).expand_as(covered)
        mid = (idx.masked_fill(~covered, 99).amin(1) + idx.masked_fill(~covered, -1).amax(1) + 1) / 2
        assert (mid[side == 0] < 16).all() and (mid[side == 1] > 16).all()


def test_build_writes_a_standard_sdxl_pipeline(test_world):
    from diffusers import StableDiffusionXLPipeline

    from golden_noise.diffusion import latent_shape, load_pipeline, sample_images, seeded_noise

    for name in ("model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                 "scheduler", "prompts.txt", "world.json", "toy_reward/config.json", "toy_reward/model.safetensors"):
        assert (test_world / name).exists(), name
    pipe = load_pipeline(str(test_world), dtype="float32", device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
    assert latent_shape(pipe) == (4, 8, 8) and pipe.vae_scale_factor == 4
    prompts = (test_world / "prompts.txt").read_text().splitlines()
    assert prompts == SPEC.all_captions() and len(prompts) == 16
    images = sample_images(pipe, prompts[:2], seeded_noise([0, 1], latent_shape(pipe)), num_inference_steps=2,
                           guidance_scale=5.0)
    assert [im.size for im in images] == [(32, 32), (32, 32)]
    card = json.loads((test_world / "world.json").read_text())
    assert card["preset"] == "test" and card["seed"] == 0 and card["latent_shape"] == [4, 8, 8]
    assert {"vae_s", "reward_s", "unet_s", "total_s"} <= set(card["timings"])
    # the VAE config (de)normalises latents per channel, as the SDXL pipeline reads it
    assert len(pipe.vae.config.latents_mean) == 4 and len(pipe.vae.config.latents_std) == 4


def test_training_conditioning_matches_the_pipeline(test_world):
    """The builder trains on `encode_token_ids`; sampling uses `pipe.encode_prompt`: they must agree."""
    from golden_noise.diffusion import load_pipeline
    from golden_noise_toy.components import encode_token_ids

    pipe = load_pipeline(str(test_world), dtype="float32", device="cpu")
    prompts = SPEC.all_captions()[:3]
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device="cpu", do_classifier_free_guidance=False)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        mine, mine_pooled = encode_token_ids(pipe.text_encoder, pipe.text_encoder_2, ids)
    torch.testing.assert_close(mine, embeds)
    torch.testing.assert_close(mine_pooled, pooled)
    # and the unconditional branch is all zeros, which the builder's caption dropout trains
    _, neg, _, neg_pooled = pipe.encode_prompt(prompt=prompts, device="cpu", do_classifier_free_guidance=True)
    assert neg.abs().sum() == 0 and neg_pooled.abs().sum() == 0


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_builder_is_deterministic(test_world, tmp_path):
    """Two builds in separate processes with 2 threads give byte-identical weights: multi-threaded kernels
    (e.g. the text encoders' embedding backward) must not sum in a timing-dependent order."""
    builds = []
    for name in ("one", "two"):
        run_cli("scripts/build_toy_world.py", "--output_dir", tmp_path / name, "--preset", "test", "--threads", 2,
                "--quiet", check=True)
        builds.append(_weights(tmp_path / name))
    first, second = builds
    assert len(first) == 5 and first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first), [k for k in first if first[k] != second[k]]
    other = tmp_path / "other"
    build_world(other, "test", seed=1, quiet=True)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _weights(other)[unet] != _weights(test_world)[unet]


def test_reward_ranks_the_prompted_render_first(test_world):
    from golden_noise.rewards.base import available_rewards, load_reward

    assert "toy_attributes" in available_rewards()
    reward = load_reward("toy_attributes", path=str(test_world), batch_size=7, unknown_option=1)
    captions = SPEC.all_captions()
    k = len(captions)
    labels = torch.tensor([[c, s, z, p] for p in range(2) for z in range(2) for c in range(2) for s in range(2)])
    scenes = sample_scenes(SPEC, k, torch.Generator().manual_seed(11), labels=labels)
    assert scenes.captions(SPEC) == captions
    images = render(SPEC, scenes)
    # score every render against every caption: (render i, caption j)
    scores = torch.tensor(reward.score(images.repeat_interleave(k, 0), captions * k)).view(k, k)
    assert ((0 <= scores) & (scores <= 1)).all()
    others = (scores.sum(1) - scores.diag()) / (k - 1)
    assert (scores.diag() > others).all(), scores
    # the world's own (clean) test renders in PIL form score like tensors
    from PIL import Image

    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    torch.testing.assert_close(torch.tensor(reward.score(pil, captions)), scores.diag(), atol=0.02, rtol=0)
    with pytest.raises(UserError, match="names none"):
        reward.score(images[:1], ["a photo of a cat"])


def test_reward_needs_a_world(tmp_path):
    from golden_noise.rewards.base import load_reward

    with pytest.raises(UserError, match="toy world"):
        load_reward("toy_attributes")
    with pytest.raises(UserError, match="no toy-world reward"):
        load_reward("toy_attributes", path=str(tmp_path))


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_cli_builds_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "w"
    proc = run_cli("scripts/build_toy_world.py", "--output_dir", out, "--preset", "test", "--threads", 1, "--quiet",
                   check=True)
    assert "toy world written to" in proc.stdout and "reward accuracy" in proc.stdout
    assert (out / "model_index.json").is_file()
    proc = run_cli("scripts/build_toy_world.py", "--output_dir", out, "--preset", "test", "--quiet")
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert not list(tmp_path.glob(".w.building*"))  # nothing half-built left behind


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_measure_oracle_gain_cli(test_world, tmp_path):
    out = tmp_path / "oracle.json"
    proc = run_cli("scripts/measure_oracle_gain.py", "--world", test_world, "--num_pairs", 4, "--n", 1, 2,
                   "--guidance_scales", 1.0, "--num_inference_steps", 2, "--batch_size", 3, "--quiet",
                   "--output_json", out, check=True)
    result = json.loads(out.read_text())
    assert result["pairs"] == 4 and [(r["guidance_scale"], r["n"]) for r in result["results"]] == [(1.0, 1), (1.0, 2)]
    row = result["results"][0]
    assert row["ci95"][0] <= row["gain"] <= row["ci95"][1]
    assert abs(row["oracle"] - row["standard"] - row["gain"]) < 1e-3
    assert 0 < result["relative_delta_n1"] < 1
    assert row["win_rate"] * 8 == int(row["win_rate"] * 8)  # 4 pairs, a tie counting half: a multiple of 1/8
    # The printed table (golden_noise.tables): a title, a header, a rule, then a row per (cfg, n) with the JSON's
    # numbers.
    lines = proc.stdout.strip().splitlines()
    assert lines[1].split() == ["cfg", "n", "standard", "oracle", "gain", "95%", "CI", "win", "acc", "std", "acc",
                                "orc"]
    assert set(lines[2].replace(" ", "")) == {"-"}
    cells = lines[3].split()
    assert cells[:5] == ["1", "1", f"{row['standard']:.4f}", f"{row['oracle']:.4f}", f"{row['gain']:+.4f}"]
    assert " ".join(cells[5:7]) == f"[{row['ci95'][0]:+.4f}, {row['ci95'][1]:+.4f}]"
    assert cells[7] == f"{row['win_rate']:.3f}"


class _RecordingReward:
    """Mean brightness rounded to `step` (so pairs can tie), recording every batch it scores."""

    def __init__(self, step: float):
        self.step, self.calls = step, []

    def score(self, images, prompts):
        import numpy as np

        scores = [round(float(np.asarray(im, dtype=np.float64).mean() / 255) / self.step) * self.step
                  for im in images] if self.step else [0.5] * len(images)
        self.calls.append(scores)
        return scores


def test_oracle_gain_uses_the_shared_statistics(test_world):
    """The oracle's CI and win rate are golden_noise.stats' (one bootstrap, ties count as half a win), as in
    every evaluation: equal scores are a 0.5 win rate, not 0."""
    import numpy as np

    from golden_noise.diffusion import load_pipeline
    from golden_noise.stats import bootstrap_ci, win_rate
    from golden_noise_toy.oracle import measure_oracle_gain

    pipe = load_pipeline(str(test_world), dtype="float32", device="cpu")
    prompts, seeds = (test_world / "prompts.txt").read_text().splitlines()[:2] * 3, list(range(6))
    kwargs = dict(n_values=(1,), guidance_scales=(1.0,), num_inference_steps=2, batch_size=6, resamples=300,
                  quiet=True)
    row = measure_oracle_gain(pipe, _RecordingReward(0.0), prompts, seeds, **kwargs)["results"][0]
    assert (row["gain"], row["ci95"], row["win_rate"]) == (0.0, [0.0, 0.0], 0.5)

    reward = _RecordingReward(4e-5)  # about the size of the differences: some pairs tie, some do not
    row = measure_oracle_gain(pipe, reward, prompts, seeds, **kwargs)["results"][0]
    standard, oracle = (np.array(c) for c in reward.calls)  # one batch each: standard, then oracle n=1
    diff = oracle - standard
    assert row["win_rate"] == round(win_rate(diff), 3)
    assert row["ci95"] == [round(v, 4) for v in bootstrap_ci(diff, samples=300, seed=0)]
    assert row["gain"] == round(float(diff.mean()), 4)


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_probe_finds_what_the_pooled_embedding_loses(tmp_path):
    """The committed world's diagnosis behind --text_embedding pooled+mean_token (README results): a linear probe
    reads every attribute of unseen captions from the token mean, but not the position from the pooled embedding."""
    proc = run_cli("scripts/probe_text_embeddings.py", "--world", "worlds/toy_shapes", "--test_size", 24, check=True)
    rows = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in proc.stdout.splitlines()[2:]}
    assert proc.stdout.splitlines()[1].split()[2:] == ["color", "shape", "size", "position"]
    assert rows["mean_token"] == rows["pooled+mean_token"] == [1.0, 1.0, 1.0, 1.0]
    assert rows["pooled"][:3] == [1.0, 1.0, 1.0] and rows["pooled"][3] < 0.5
    bad = tmp_path / "bad.txt"
    bad.write_text("a red circle\n", encoding="utf-8")
    proc = run_cli("scripts/probe_text_embeddings.py", "--world", "worlds/toy_shapes", "--test_prompt_file", bad)
    assert proc.returncode != 0 and "names no size, position" in proc.stderr


@pytest.mark.slow
def test_small_preset_builds_a_world_that_follows_prompts(tmp_path, progress):
    """The CI-sized world: about 6 minutes on 2 quiet cores. Two threads only where the cores are free (two threads on
    busy cores stall each other: over 30 minutes), else one; each training phase is shown as it starts and the
    latest progress every minute. Guidance must steer samples toward the prompt."""
    out = tmp_path / "small"
    threads = idle_threads(2)
    progress(f"building the small world with {threads} thread(s) (1-minute load average {os.getloadavg()[0]:.1f})")
    proc = run_with_progress([sys.executable, "scripts/build_toy_world.py", "--output_dir", out, "--preset", "small",
                              "--threads", threads], progress, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "toy world written to" in proc.stdout
    card = json.loads((out / "world.json").read_text())
    assert card["captions"] == 288 and card["latent_shape"] == [4, 8, 8]
    assert card["reward_accuracy_clean"]["all"] > 0.95
    assert card["reward_accuracy_vae"]["all"] > 0.7
    cfg1, cfg5 = card["sampling"]["cfg_1"], card["sampling"]["cfg_5"]
    chance = sum(1 / len(v) for v in SPEC_DEFAULT.attributes.values()) / 4  # 0.25
    assert cfg5["mean_reward"] > 2 * chance and cfg5["mean_reward"] > cfg1["mean_reward"]
    assert sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) < 10 * 2 ** 20



# --- the distilled few-step student (student.py) ---------------------------------------------------------------

# the committed student's 4 steps on the 96 pairs below measured mean reward 0.990 and accuracy 0.990 (the teacher's
# own 4 unguided steps: 0.960 and 0.896); the thresholds leave a margin
STUDENT_MIN_REWARD, STUDENT_MIN_ACCURACY = 0.97, 0.93


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def student_world(test_world, tmp_path_factory) -> Path:
    """A copy of the `test` world with its `test`-preset student added in process (seconds)."""
    import shutil

    from golden_noise_toy import build_student

    world = tmp_path_factory.mktemp("student") / "world"
    shutil.copytree(test_world, world)
    build_student(world, "test", seed=0, quiet=True)
    return world


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_student_build_is_deterministic_and_adds_only_the_student(student_world, test_world, tmp_path):
    """--student_only in another process and the builder's --student component give the same bytes as an in-process
    build; the world's other files stay byte-identical and world.json only gains the "student" entry."""
    import shutil

    world = tmp_path / "cli"
    shutil.copytree(test_world, world)
    before = _tree(world)
    proc = run_cli("scripts/build_toy_world.py", "--output_dir", world, "--student_only", "--preset", "test",
                   "--threads", 2, "--quiet", check=True)
    assert "student written to" in proc.stdout and "student_2step_cfg1" in proc.stdout
    after = _tree(world)
    assert {k: v for k, v in after.items() if not k.startswith("student/")}.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k != "world.json")
    card, old = json.loads(after["world.json"]), json.loads(before["world.json"])
    assert list(card) == list(old) + ["student"] and all(card[k] == old[k] for k in old)
    student = {k: v for k, v in after.items() if k.startswith("student/")}
    assert sorted(student) == ["student/scheduler/scheduler_config.json", "student/unet/config.json",
                               "student/unet/diffusion_pytorch_model.safetensors"]
    assert student == {k: v for k, v in _tree(student_world).items() if k.startswith("student/")}
    in_process = json.loads((student_world / "world.json").read_text())["student"]
    assert card["student"]["evaluation"] == in_process["evaluation"] and card["student"]["torch_threads"] == 1
    # the builder component: a fresh world built with its student
    both = tmp_path / "both"
    summary = build_world(both, "test", seed=0, quiet=True, student=True)
    assert summary["student"]["evaluation"] == in_process["evaluation"]
    assert {k: v for k, v in _tree(both).items() if k.startswith("student/")} == student
    assert not list(tmp_path.rglob(".student.*")) and not list(tmp_path.glob(".both.*"))


def test_student_samples_through_a_standard_sdxl_pipeline(student_world):
    """The student is a diffusers UNet folder + scheduler folder: swapped into the world's StableDiffusionXLPipeline,
    `pipe(prompt, latents=x_T, num_inference_steps=K, guidance_scale=1.0)` runs K trailing-DDIM steps of the student's
    conditional branch alone (checked against a hand-written loop) from t = 999."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from golden_noise.diffusion import encode_prompts, latent_shape, load_pipeline, seeded_noise
    from golden_noise_toy import load_student

    unet = UNet2DConditionModel.from_pretrained(str(student_world / "student" / "unet"))
    scheduler = DDIMScheduler.from_pretrained(str(student_world / "student" / "scheduler"))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(student_world), unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    teacher = load_pipeline(str(student_world), dtype="float32", device="cpu")
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(unet.config) == public(teacher.unet.config)  # the world's architecture
    assert "_name_or_path" not in json.loads((student_world / "student" / "unet" / "config.json").read_text())
    assert scheduler.config.timestep_spacing == "trailing" and not scheduler.config.clip_sample
    assert {k: v for k, v in scheduler.config.items() if k != "timestep_spacing"} == \
        {k: v for k, v in teacher.scheduler.config.items() if k != "timestep_spacing"}
    trained = unet.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in teacher.unet.state_dict().items())
    prompts = SPEC.all_captions()[:3]
    x_T = seeded_noise([30_000_000, 30_000_001, 30_000_002], latent_shape(pipe))  # (3, 4, 8, 8)
    with torch.no_grad():
        out = pipe(prompt=prompts, latents=x_T, num_inference_steps=4, guidance_scale=1.0, output_type="latent").images
        # by hand: DDIM on 999 749 499 249, the conditional branch only
        cond = encode_prompts(pipe, prompts, with_uncond=False)
        ref = DDIMScheduler.from_config(scheduler.config)
        ref.set_timesteps(4)
        assert ref.timesteps.tolist() == [999, 749, 499, 249]
        x = x_T.clone()
        for t in ref.timesteps:
            x = ref.step(unet(x, t, **cond.branch("cond")).sample, t, x).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    # the package's own loader swaps in the same
    swapped = load_student(teacher, student_world)
    with torch.no_grad():
        again = swapped(prompt=prompts, latents=x_T, num_inference_steps=4, guidance_scale=1.0,
                        output_type="latent").images
    torch.testing.assert_close(again, out, rtol=0, atol=0)


@pytest.mark.slow  # over 20 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_student_refuses_a_missing_world_or_an_existing_student(student_world, test_world, tmp_path):
    """One-line errors, exit 2, and nothing written: no toy world at --output_dir; a student already there
    (without --overwrite); --student together with --student_only."""
    from golden_noise_toy import build_student, load_student

    proc = run_cli("scripts/build_toy_world.py", "--output_dir", tmp_path, "--student_only", "--preset", "test")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith(f"error: {tmp_path} is not a toy world")
    assert list(tmp_path.iterdir()) == []
    before = _tree(student_world)
    with pytest.raises(UserError, match="--overwrite to replace the student"):
        build_student(student_world, "test")
    with pytest.raises(UserError, match="unknown --preset 'huge'"):
        build_student(student_world, "huge")
    assert _tree(student_world) == before and not list(student_world.glob(".student.*"))
    proc = run_cli("scripts/build_toy_world.py", "--output_dir", tmp_path, "--student", "--student_only")
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
    with pytest.raises(UserError, match="holds no student"):
        load_student(None, tmp_path)
    with pytest.raises(UserError, match="holds no student"):  # a world without one: never its own (teacher) UNet
        load_student(None, test_world)


def test_committed_student_beats_the_teachers_few_step_sampling(repo_root):
    """worlds/toy_shapes/student, on held-out (caption, seed) pairs: 4 steps without CFG follow the prompt far better
    than the teacher's own 4 unguided steps from the same noise (thresholds measured, with margin), and its card in
    world.json reports the build's evaluation."""
    from golden_noise.diffusion import latent_shape, load_pipeline, seeded_noise
    from golden_noise_toy import load_student, load_world_card
    from golden_noise_toy.reward import ToyAttributeReward
    from golden_noise_toy.student import EVAL_SEED, TRAIN_SEED, sample_latents, sampler, student_scheduler

    world = repo_root / "worlds" / "toy_shapes"
    card = load_world_card(world)["student"]
    assert card["preset"] == "default" and card["teacher"] == {"steps": 20, "guidance_scale": 5.5,
                                                                "scheduler": "DDIMScheduler leading"}
    assert sum(f.stat().st_size for f in (world / "student").rglob("*") if f.is_file()) < 5 * 2 ** 20
    ev = card["evaluation"]
    for k in (1, 2, 4):
        assert ev[f"student_{k}step_cfg1"]["accuracy"] > ev[f"teacher_{k}step_cfg1"]["accuracy"] + 0.05
    pipe = load_pipeline(str(world), dtype="float32", device="cpu")
    captions = (world / "prompts.txt").read_text().splitlines()[::3]  # 96 captions, every attribute value
    seeds = [EVAL_SEED + 500_000 + i for i in range(len(captions))]   # never trained on (the card's start at EVAL_SEED)
    assert not TRAIN_SEED <= seeds[0] < EVAL_SEED
    x_T = seeded_noise(seeds, latent_shape(pipe))
    reward = ToyAttributeReward(path=str(world))
    scores = {}
    for name, sp in (("student", load_student(pipe, world)),
                     ("teacher", sampler(pipe, scheduler=student_scheduler(pipe.scheduler.config)))):
        d = reward.details(sample_latents(sp, captions, x_T, 4, 1.0, 96, output_type="pil"), captions)
        scores[name] = (sum(d["score"]) / len(captions), sum(d["all_correct"]) / len(captions))
    (student, student_acc), (teacher, teacher_acc) = scores["student"], scores["teacher"]
    assert student > STUDENT_MIN_REWARD and student_acc > STUDENT_MIN_ACCURACY, scores
    assert student - teacher > 0.015 and student_acc - teacher_acc > 0.04, scores
