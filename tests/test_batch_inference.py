"""Stage 5: scripts/batch_inference.py on the tiny offline pipeline: layout, manifest, equality with the plain
pipeline and with the golden step, 1 vs 2 processes, resume after an interrupt, bad inputs."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from golden_noise.diffusion import encode_prompts, seeded_noise
from golden_noise.golden import golden_step
from golden_noise.errors import UserError
from golden_noise.inference.batch import recorded_images
from golden_noise.io import load_tensor
from tests.conftest import ROOT, load_cli, run_cli
from tests.test_inference import TRAIN_GOLDEN, TRAIN_STEPS, make_export, pixels

PROMPTS = ["a red apple on a table", "a blue car", "", "a cat wearing a hat", "synthwave city at sunset",
           "a lighthouse in a storm"]
INDICES = [0, 1, 3, 4, 5]               # line 2 is blank: skipped, but later indices keep their line numbers
BATCHES = [[0, 1], [3, 4], [5]]          # global batches of --batch_size 2
METHODS = ["standard", "gnsnet", "oracle"]
START_SEED, STEPS, SCALE = 1000, 3, 5.5
# Bit-equal results across runs need the same CPU thread count per process (accelerate uses 1 per process).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("batch")
    prompt_file = root / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    run = root / "run"
    make_export(run / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir)
    return {"root": root, "prompt_file": prompt_file, "export": run}


def batch_args(setup: dict, out: Path) -> list:
    return ["--prompt_file", setup["prompt_file"], "--output_base_dir", out, "--rnn_weights_path", setup["export"],
            "--methods", *METHODS, "--batch_size", 2, "--num_inference_steps", STEPS, "--guidance_scale", SCALE,
            "--start_seed", START_SEED, "--save_noise"]


@pytest.fixture(scope="module")
def reference(setup) -> Path:
    """One uninterrupted single-process run."""
    out = setup["root"] / "reference"
    run_cli("scripts/batch_inference.py", *batch_args(setup, out), "--device", "cpu", env=ONE_THREAD, check=True)
    return out


def outputs(out: Path) -> dict[str, bytes]:
    """Every image and noise file under `out`, by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in (".png", ".pt")}


def manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


RESULT_FILES = ("manifest.csv", "summary.json", "batch_settings.json")  # beside the images and noises


def results(out: Path) -> dict[str, bytes]:
    """The result files of a stage-5 folder: images, noises, manifest.csv, summary.json, batch_settings.json (not
    timings.csv and run.json, which record what differs from run to run)."""
    return {**outputs(out), **{name: (out / name).read_bytes() for name in RESULT_FILES}}


def test_layout_manifest_summary(reference):
    for method in METHODS:
        assert sorted(p.name for p in (reference / f"{method}_output").iterdir()) == [f"{i}.png" for i in INDICES]
        assert sorted(p.name for p in (reference / "noise" / method).iterdir()) == [f"{i}.pt" for i in INDICES]
    rows = manifest(reference)
    assert list(rows[0]) == ["index", "prompt", "seed", "method", "file", "unet_evals"]
    assert [(int(r["index"]), r["method"]) for r in rows] == [(i, m) for i in INDICES for m in METHODS]
    for r in rows:
        i = int(r["index"])
        assert r["prompt"] == PROMPTS[i] and int(r["seed"]) == START_SEED + i
        assert r["file"] == f"{r['method']}_output/{i}.png" and float(r["unet_evals"]) > 0
    with open(reference / "timings.csv", encoding="utf-8", newline="") as f:
        timings = list(csv.DictReader(f))
    assert [(r["index"], r["method"]) for r in timings] == [(r["index"], r["method"]) for r in rows]
    assert all(float(r["seconds"]) == pytest.approx(float(r["noise_seconds"]) + float(r["sampling_seconds"]),
                                                     abs=2e-6) and float(r["seconds"]) > 0 for r in timings)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary == {"num_prompts": 5, "batch_size": 2, "num_gen_steps": TRAIN_STEPS,
                       "methods": {m: {"images": 5} for m in METHODS}}
    run = json.loads((reference / "run.json").read_text())
    assert run["num_processes"] == 1 and run["output_base_dir"] == str(reference) and run["device_used"] == "cpu"
    for method in METHODS:
        s = run["methods"][method]
        assert (s["generated_this_run"], s["skipped_existing"]) == (5, 0)
        assert s["mean_sampling_seconds_per_image"] == pytest.approx(
            np.mean([float(r["sampling_seconds"]) for r in timings if r["method"] == method]))
    assert run["methods"]["gnsnet"]["mean_noise_seconds_per_image"] > 0
    settings = json.loads((reference / "batch_settings.json").read_text())
    assert settings["golden"] == TRAIN_GOLDEN.to_dict()  # the oracle follows the RNN's training data
    # the job's flags, then what they resolved to
    from golden_noise.prompts import prompt_fingerprint, read_prompts

    weights = (reference.parent / "run" / "rnn_v3_model_final.safetensors").resolve()
    assert (settings["batch_size"], settings["start_seed"], settings["methods"]) == (2, START_SEED, METHODS)
    assert settings["prompt_fingerprint"] == prompt_fingerprint(read_prompts(reference.parent / "prompts.txt"))
    assert run["rnn_weights_file"] == str(weights)  # the absolute path: run.json, not the settings
    assert not {"rnn_weights_file", "output_base_dir", "num_processes", "device", "device_used"} & set(settings)
    assert settings["rnn_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert [settings[k] for k in ("dtype", "dtype_used", "num_gen_steps_used")] == ["auto", "float32", TRAIN_STEPS]
    assert (settings["height_used"], settings["latent_shape"], settings["scheduler_class"]) == (16, [4, 16, 16],
                                                                                               "DDIMScheduler")
    assert settings["classifier_free_guidance"] and set(settings["versions"]) >= {"torch", "diffusers"}
    assert not (reference / ".manifest_parts").exists()


def test_standard_equals_plain_pipeline(reference, tiny_pipeline):
    """standard_output/{i}.png == pipe(prompts, generator=[manual_seed(start_seed + i)]) for its global batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in BATCHES:
            generators = [torch.Generator().manual_seed(START_SEED + i) for i in batch]
            images = tiny_pipeline([PROMPTS[i] for i in batch], generator=generators, num_inference_steps=STEPS,
                                   guidance_scale=SCALE).images
            for i, image in zip(batch, images):
                assert np.array_equal(pixels(reference / "standard_output" / f"{i}.png"),
                                      np.asarray(image.convert("RGB"))), i
    finally:
        torch.set_num_threads(threads)


def test_oracle_and_gnsnet_noises(reference, setup, tiny_pipeline):
    """oracle = the shared core's golden step (the RNN's training parameters) applied n times to x_T;
    gnsnet = the RNN's rollout from x_T; standard = x_T."""
    from golden_noise import GoldenNoise

    pipe = tiny_pipeline
    gn = GoldenNoise.from_pretrained(setup["export"], pipe=pipe)
    step = golden_step(pipe, TRAIN_GOLDEN)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in BATCHES:
            texts = [PROMPTS[i] for i in batch]
            x_T = seeded_noise([START_SEED + i for i in batch], (4, 16, 16))
            oracle = step.sequence(x_T, encode_prompts(pipe, texts), TRAIN_STEPS)[:, -1]
            gnsnet = gn.rollout(x_T, gn.text_embeddings(texts), TRAIN_STEPS)[:, -1]
            for k, i in enumerate(batch):
                saved = {m: load_tensor(reference / "noise" / m / f"{i}.pt") for m in METHODS}
                assert torch.equal(saved["standard"], x_T[k])
                torch.testing.assert_close(saved["oracle"], oracle[k], rtol=0, atol=1e-6)
                torch.testing.assert_close(saved["gnsnet"], gnsnet[k], rtol=0, atol=1e-6)
                assert not torch.allclose(saved["oracle"], x_T[k]) and not torch.allclose(saved["gnsnet"], x_T[k])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # over 30 s on 2 busy cores: bash scripts/test.sh --all (CI) runs it
def test_two_processes_give_the_same_files(reference, setup):
    out = setup["root"] / "two_processes"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "scripts" / "batch_inference.py"), *map(str, batch_args(setup, out))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["num_processes"] == 2  # really two, not two rank-0-of-1
    # another folder, another process count: every result file is byte-identical (timings live in timings.csv and
    # run.json)
    assert results(out) == results(reference)


def test_interrupted_run_resumes_to_the_same_result(reference, setup):
    """Ctrl-C a run after its first image, rerun the same command: same files and manifest as uninterrupted."""
    out = setup["root"] / "interrupted"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    cmd = [sys.executable, str(ROOT / "scripts" / "batch_inference.py"), *map(str, batch_args(setup, out)),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    deadline = time.monotonic() + 300
    while proc.poll() is None and not any(out.glob("*_output/*.png")) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (130, 0), err[-2000:]  # 0 only if it finished before the signal landed
    done = len(list(out.glob("*_output/*.png")))
    assert done >= 1
    if proc.returncode == 130:
        assert "rerun the same command to resume" in err
        assert done < len(INDICES) * len(METHODS)

    cli = load_cli("scripts/batch_inference.py")  # the rerun in process (1 thread, like the subprocesses)
    summary = cli.main(cli.parse_args([str(a) for a in batch_args(setup, out)] + ["--device", "cpu"]))
    assert results(out) == results(reference)  # byte for byte, manifest, summary and settings included
    skipped = sum(s["skipped_existing"] for s in summary["methods"].values())
    generated = sum(s["generated_this_run"] for s in summary["methods"].values())
    assert (skipped, generated) == (done, len(INDICES) * len(METHODS) - done)
    assert not list(out.rglob(".*.tmp"))  # no temporary file left behind


def test_rerun_with_other_settings_is_refused(reference, setup):
    cli = load_cli("scripts/batch_inference.py")
    before = outputs(reference)
    args = [str(a) for a in batch_args(setup, reference)]
    args[args.index("--guidance_scale") + 1] = "7.0"
    with pytest.raises(UserError, match=r"other inputs or settings \(guidance_scale: 5.5 -> 7.0\)"):
        cli.main(cli.parse_args([*args, "--device", "cpu"]))
    assert outputs(reference) == before


def test_a_changed_or_edited_export_is_refused(setup, tmp_path, capsys):
    """Issue 20 item 4: the export's identity (weights sha256 + config sha256) is part of batch_settings.json. A
    rerun after the seed's tamper (delta_scale edited in the export's json) fails to load the export, naming the
    file; an export of the format before the seal whose config was edited loads, but the rerun is refused naming
    rnn_config_sha256; no image changes."""
    from golden_noise.export import config_sha256
    from golden_noise.testing.hub import unseal_export
    from tests.test_inference import run_in_process

    cli = load_cli("scripts/batch_inference.py")
    for sealed in (True, False):
        run, out = tmp_path / f"run{sealed}", tmp_path / f"out{sealed}"
        shutil.copytree(setup["export"], run)
        if not sealed:
            unseal_export(run / "rnn_v3_model_final.safetensors")
        config = run / "rnn_v3_model_final.json"
        args = ["--prompt_file", setup["prompt_file"], "--output_base_dir", out, "--rnn_weights_path", run,
                "--methods", "gnsnet", "--batch_size", 2, "--num_inference_steps", 2, "--device", "cpu"]
        cli.main(cli.parse_args([str(a) for a in args]))
        doc = json.loads(config.read_text())
        assert json.loads((out / "batch_settings.json").read_text())["rnn_config_sha256"] == config_sha256(doc)
        before = snapshot(out)
        if sealed:  # the seed's tamper: a smaller change per step, silently
            config.write_text(json.dumps({**doc, "model_config": {**doc["model_config"], "delta_scale": 0.01}}))
            message = f"error: {config} does not belong to rnn_v3_model_final.safetensors: edited after export"
        else:  # an edit the older format cannot detect by itself (the config hash is not in its weights)
            doc["run_config"]["prompt_file"] = "elsewhere.txt"
            config.write_text(json.dumps(doc))
            message = "error: " + str(out) + r" holds images made with other inputs or settings \(rnn_config_sha256: "
        code, err = run_in_process(cli, args, capsys)
        line = err.strip().splitlines()[-1]
        assert code == 2 and re.match(re.escape(message) if sealed else message, line), err
        assert "Traceback" not in err and snapshot(out) == before


def test_bad_inputs(setup, tiny_pipeline, tiny_pipeline_dir, tmp_path, capsys):
    cli = load_cli("scripts/batch_inference.py")
    base = ["--output_base_dir", str(tmp_path / "out"), "--base_model_id", str(tiny_pipeline_dir),
            "--device", "cpu", "--num_inference_steps", "2"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="holds no prompts"):
        cli.main(cli.parse_args(["--prompt_file", str(empty), "--methods", "standard", *base]))
    with pytest.raises(UserError, match="does not exist"):
        cli.main(cli.parse_args(["--prompt_file", str(tmp_path / "none.txt"), "--methods", "standard", *base]))
    with pytest.raises(UserError, match="needs --rnn_weights_path"):
        cli.main(cli.parse_args(["--prompt_file", str(setup["prompt_file"]), "--methods", "gnsnet", *base]))
    with pytest.raises(UserError, match="does not exist"):
        cli.main(cli.parse_args(["--prompt_file", str(setup["prompt_file"]), *base,
                                 "--rnn_weights_path", str(tmp_path / "no_run")]))
    small = make_export(tmp_path / "small", tiny_pipeline, tiny_pipeline_dir, noise_resolution=8)
    with pytest.raises(UserError, match=r"latents \[4, 8, 8\]"):
        cli.main(cli.parse_args(["--prompt_file", str(setup["prompt_file"]), *base, "--rnn_weights_path", str(small),
                                 "--height", "16", "--width", "16"]))
    for bad in (["--scheduler", "plms"], ["--methods", "golden"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit) as e:
            cli.parse_args(["--prompt_file", str(setup["prompt_file"]), *bad])
        assert e.value.code == 2
    assert "invalid choice: 'plms'" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.png")) if (tmp_path / "out").exists() else True


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `out` (hidden ones too): its bytes and modification time."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_rerun_with_other_prompts_or_batch_size_is_refused(reference, setup, tmp_path):
    """Another --prompt_file (other prompts) or another --batch_size into a finished folder is refused, naming the
    difference, and no file there changes (not even its time stamp)."""
    cli = load_cli("scripts/batch_inference.py")
    before = snapshot(reference)
    other = tmp_path / "other.txt"
    other.write_text("\n".join([*PROMPTS[:3], "a different prompt", *PROMPTS[4:]]) + "\n", encoding="utf-8")
    args = [str(a) for a in batch_args(setup, reference)] + ["--device", "cpu"]
    with pytest.raises(UserError, match=r"other inputs or settings \(prompt_fingerprint: [0-9a-f]{12}\.\.\. -> "
                                        r"[0-9a-f]{12}\.\.\.\)"):
        cli.main(cli.parse_args([*args, "--prompt_file", str(other)]))
    with pytest.raises(UserError, match=r"other inputs or settings \(batch_size: 2 -> 3\)"):
        cli.main(cli.parse_args([*args, "--batch_size", "3"]))
    assert snapshot(reference) == before


def test_methods_may_be_added_to_a_folder(setup, tmp_path):
    """A rerun may add methods (the earlier images stay untouched, the settings list every method and keep the
    RNN that made the gnsnet images); the standard images equal a single run with both methods."""
    cli = load_cli("scripts/batch_inference.py")
    out = tmp_path / "grow"
    common = ["--prompt_file", str(setup["prompt_file"]), "--output_base_dir", str(out), "--num_inference_steps", "2",
              "--batch_size", "2", "--device", "cpu", "--rnn_weights_path", str(setup["export"])]
    first = cli.main(cli.parse_args([*common, "--methods", "standard"]))
    assert first["methods"]["standard"]["generated_this_run"] == len(INDICES)
    standard = snapshot(out / "standard_output")
    second = cli.main(cli.parse_args([*common, "--methods", "standard,gnsnet"]))  # the old comma style
    assert (second["methods"]["standard"]["skipped_existing"], second["methods"]["gnsnet"]["generated_this_run"]) \
        == (len(INDICES), len(INDICES))
    assert snapshot(out / "standard_output") == standard
    summary_both = (out / "summary.json").read_bytes()
    third = cli.main(cli.parse_args([*common, "--methods", "standard"]))  # nothing to do; the gnsnet record stays
    # summary.json still lists the gnsnet images a run with fewer --methods left in place (issue 20 item 7)
    assert (out / "summary.json").read_bytes() == summary_both
    assert json.loads(summary_both)["methods"] == {"standard": {"images": len(INDICES)},
                                                   "gnsnet": {"images": len(INDICES)}}
    assert third["methods"]["gnsnet"]["generated_this_run"] == 0 and third["num_gen_steps"] == TRAIN_STEPS
    settings = json.loads((out / "batch_settings.json").read_text())
    assert settings["methods"] == ["standard", "gnsnet"] and settings["rnn_sha256"] is not None
    assert [(int(r["index"]), r["method"]) for r in manifest(out)] == [(i, m) for i in INDICES
                                                                        for m in ("standard", "gnsnet")]
    both = tmp_path / "both"
    cli.main(cli.parse_args([*common, "--output_base_dir", str(both), "--methods", "standard", "gnsnet"]))
    assert outputs(both) == outputs(out)


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, start of its data, length) of every chunk of a PNG file."""
    pos, chunks = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunks.append((data[pos + 4:pos + 8], pos + 8, length))
        pos += 12 + length
    return chunks


def test_damaged_pngs_are_made_again_on_resume(reference, setup, tmp_path):
    """Issue 20 item 2 (stage 5): a resume verifies images fully. A PNG whose chunk CRC is wrong (its pixels intact),
    and one whose compressed pixels are damaged under a recomputed CRC (only decoding finds it), are both made again;
    the folder ends byte-identical to the uninterrupted run."""
    import zlib

    from golden_noise.inference.batch import intact_png

    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    bad_crc, bad_pixels = out / "gnsnet_output" / "1.png", out / "oracle_output" / "4.png"
    data = bytearray(bad_crc.read_bytes())
    kind, start, length = next(c for c in _png_chunks(bytes(data)) if c[0] == b"IDAT")
    data[start + length] ^= 0x01  # the first byte of the IDAT chunk's CRC
    bad_crc.write_bytes(bytes(data))
    data = bytearray(bad_pixels.read_bytes())
    kind, start, length = next(c for c in _png_chunks(bytes(data)) if c[0] == b"IDAT")
    data[start + length // 2] ^= 0xFF  # inside the deflate stream
    data[start + length:start + length + 4] = zlib.crc32(bytes(data[start - 4:start + length])).to_bytes(4, "big")
    bad_pixels.write_bytes(bytes(data))
    assert not intact_png(bad_crc) and not intact_png(bad_pixels) and intact_png(reference / "gnsnet_output" / "1.png")
    from PIL import Image

    with Image.open(bad_crc) as image:  # what the old check (signature + IEND) and PIL alone let through
        image.load()

    cli = load_cli("scripts/batch_inference.py")
    summary = cli.main(cli.parse_args([str(a) for a in batch_args(setup, out)] + ["--device", "cpu"]))
    assert {m: s["generated_this_run"] for m, s in summary["methods"].items()} == \
        {"standard": 0, "gnsnet": 1, "oracle": 1}
    assert results(out) == results(reference)


def test_killed_run_with_default_flags_resumes_exactly(setup, tmp_path):
    """kill -9 a run under the default flags right after its first image; a stale temporary file and a truncated
    image are left behind as a crash can leave them. The rerun removes the temporary file, regenerates the damaged
    image and ends byte-identical (images and manifest) to an uninterrupted run."""
    cli = load_cli("scripts/batch_inference.py")
    required = ["--prompt_file", str(setup["prompt_file"]), "--rnn_weights_path", str(setup["export"])]
    reference = tmp_path / "uninterrupted"
    cli.main(cli.parse_args([*required, "--output_base_dir", str(reference)]))

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ONE_THREAD}
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "batch_inference.py"), *required,
                             "--output_base_dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, cwd=str(ROOT))
    deadline = time.monotonic() + 300
    while proc.poll() is None and not any(out.glob("*_output/*.png")) and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.communicate(timeout=60)
    images = sorted(out.glob("*_output/*.png"))
    assert proc.returncode == -signal.SIGKILL and 1 <= len(images) < 2 * len(INDICES)
    assert not (out / "manifest.csv").exists()  # killed before any merge
    stale = images[0].with_name(f".{images[0].name}.99999.0123abcd.tmp")
    stale.write_bytes(b"half an image")
    foreign = out / ".notes.tmp"  # not a name atomic writes use: left alone
    foreign.write_text("mine")
    images[0].write_bytes(images[0].read_bytes()[:100])  # truncated
    # kept: the intact images whose manifest row reached the disk before the kill (the kill may land between an
    # image and its row: that image is made again)
    recorded = recorded_images(out)
    kept = [p for p in images[1:] if (int(p.stem), p.parent.name.removesuffix("_output")) in recorded]

    summary = cli.main(cli.parse_args([*required, "--output_base_dir", str(out)]))
    assert results(out) == results(reference)
    assert not stale.exists() and foreign.read_text() == "mine"
    assert sum(s["generated_this_run"] for s in summary["methods"].values()) == 2 * len(INDICES) - len(kept)


def test_an_image_without_its_manifest_row_is_made_again(reference, setup, tmp_path):
    """A kill between an image's write and its manifest row leaves an intact image no row records: the rerun
    makes it again (here a stand-in PNG with other pixels) rather than skip it and lose its row."""
    out = tmp_path / "unrecorded"
    shutil.copytree(reference, out)
    rows = manifest(out)
    lost = next(r for r in rows if r["method"] == "gnsnet")
    with open(out / "manifest.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(r for r in rows if r is not lost)
    shutil.copyfile(out / "standard_output" / f"{lost['index']}.png", out / lost["file"])  # intact, wrong pixels
    assert (int(lost["index"]), "gnsnet") not in recorded_images(out)

    cli = load_cli("scripts/batch_inference.py")
    summary = cli.main(cli.parse_args([str(a) for a in batch_args(setup, out)] + ["--device", "cpu"]))
    assert {m: s["generated_this_run"] for m, s in summary["methods"].items()} == \
        {"standard": 0, "gnsnet": 1, "oracle": 0}
    assert results(out) == results(reference)


def test_one_line_errors_before_any_model(setup, tmp_path, capsys):
    """Unwritable --output_base_dir (/proc, below a regular file) and negative guidance scales (sampling and the
    oracle's) fail with one line naming the flag, exit 2, before any model is loaded (the export does not exist)."""
    from tests.test_inference import run_in_process

    cli = load_cli("scripts/batch_inference.py")
    base = ["--prompt_file", setup["prompt_file"], "--rnn_weights_path", tmp_path / "no_such_run", "--device", "cpu"]
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    out = ["--output_base_dir", tmp_path / "o"]
    cases = [(["--output_base_dir", "/proc/x"], "error: --output_base_dir /proc/x is not a writable folder"),
             (["--output_base_dir", a_file / "sub"], f"error: --output_base_dir {a_file / 'sub'} is not a writable"),
             ([*out, "--guidance_scale", "-2"], "error: --guidance_scale must not be negative"),
             ([*out, "--methods", "oracle", "--denoise_guidance_scale", "-1"],
              "error: --denoise_guidance_scale must not be negative"),
             ([*out, "--methods", "oracle", "--inversion_guidance_scale", "-1"],
              "error: --inversion_guidance_scale must not be negative")]
    for extra, message in cases:
        code, err = run_in_process(cli, [*base, *extra], capsys)
        assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def test_seed_spellings_memory_flags_and_guidance_record(setup, tiny_pipeline, tiny_pipeline_dir, tmp_path):
    """The seed's `.pth` name and --predict_variance; --enable_vae_slicing/--enable_vae_tiling run and make images;
    --enable_model_cpu_offload on CPU is a one-line error; a scale <= 1 is recorded as no guidance."""
    from PIL import Image

    cli = load_cli("scripts/batch_inference.py")
    out = tmp_path / "flags"
    common = ["--prompt_file", str(setup["prompt_file"]), "--num_inference_steps", "2", "--device", "cpu",
              "--output_base_dir", str(out)]
    pth = str(setup["export"] / "rnn_v3_model_final.pth")
    cli.main(cli.parse_args([*common, "--rnn_weights_path", pth, "--predict_variance", "--enable_vae_slicing",
                             "--enable_vae_tiling", "--guidance_scale", "0.8"]))
    for method in ("standard", "gnsnet"):
        for i in INDICES:
            with Image.open(out / f"{method}_output" / f"{i}.png") as image:
                assert image.size == (16, 16)
    settings = json.loads((out / "batch_settings.json").read_text())
    assert json.loads((out / "run.json").read_text())["rnn_weights_file"] == str(
        (setup["export"] / "rnn_v3_model_final.safetensors").resolve())
    assert settings["enable_vae_slicing"] and settings["enable_vae_tiling"] and settings["dtype_used"] == "float32"
    assert (settings["guidance_scale_effective"], settings["classifier_free_guidance"]) == (1.0, False)
    with pytest.raises(UserError, match="--enable_model_cpu_offload"):
        cli.main(cli.parse_args([*common, "--rnn_weights_path", pth, "--enable_model_cpu_offload",
                                 "--output_base_dir", str(tmp_path / "offload")]))
    no_var = make_export(tmp_path / "novar" / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir,
                         predict_variance=False)
    with pytest.raises(UserError, match="--predict_variance was given, but the RNN export"):
        cli.main(cli.parse_args([*common, "--rnn_weights_path", str(no_var), "--predict_variance",
                                 "--output_base_dir", str(tmp_path / "nv")]))


def test_folder_in_use_is_refused(setup, tiny_pipeline_dir, tmp_path):
    """A second run of the same batches into a folder a running job holds (another process: the lock is a POSIX
    record lock on the job's global batches) is refused and writes nothing there; a run of other batches (another
    task of a K-run job) is not."""
    cli = load_cli("scripts/batch_inference.py")
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from golden_noise.runs import RunLock; "
                               "RunLock(sys.argv[1], '--output_base_dir', [1], what='batch').acquire(); "
                               "print('held', flush=True); time.sleep(120)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # it holds global batch 1 of 3
        base = ["--prompt_file", str(setup["prompt_file"]), "--methods", "standard", "--num_inference_steps", "2",
                "--device", "cpu", "--batch_size", "2", "--base_model_id", str(tiny_pipeline_dir)]
        with pytest.raises(UserError, match=rf"busy is in use by a running job \(pid {holder.pid}, batch 1\)"):
            cli.main(cli.parse_args([*base, "--output_base_dir", str(out)]))
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
        # task 0 of 2 makes batches 0 and 2 beside it (and leaves the folder's summary to the run that completes it)
        summary = cli.main(cli.parse_args([*base, "--output_base_dir", str(out), "--num_shards", "2",
                                           "--shard_index", "0"]))
        assert sorted(p.name for p in (out / "standard_output").iterdir()) == ["0.png", "1.png", "5.png"]
        assert [m["batch"] for m in summary["missing"]] == [1, 1] and not (out / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- K separate runs (machines) into one folder
def test_three_tasks_in_turn_equal_one_run(reference, setup, tmp_path, capsys, monkeypatch):
    """--num_shards 3: tasks 0 and 2 make only their global batches (0 and 2) and write no summary; --finalize then
    names what is missing (one line, exit 2); task 1, placed by Slurm's array variables, completes the folder and
    writes manifest.csv and summary.json: every file as one run makes it. --finalize then rewrites the same files."""
    from tests.test_inference import run_in_process

    cli = load_cli("scripts/batch_inference.py")
    out = tmp_path / "tasks"
    args = [str(a) for a in batch_args(setup, out)] + ["--device", "cpu"]
    for i in (0, 2):
        summary = cli.main(cli.parse_args([*args, "--num_shards", "3", "--shard_index", str(i)]))
        assert {m: s["generated_this_run"] for m, s in summary["methods"].items()} == dict.fromkeys(
            METHODS, len(BATCHES[i]))
        assert {m["batch"] for m in summary["missing"]} == {1, 2} - {i} and not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "oracle_output").iterdir()) == ["0.png", "1.png", "5.png"]
    assert len(list((out / ".manifest_parts").glob("task*-rank0-*.jsonl"))) == 2
    code, err = run_in_process(cli, [*args, "--finalize"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --finalize: 6 of 15 images are missing (global batch(es) 1; e.g. "
                          f"standard_output/3.png) in {out}")
    assert not (out / "manifest.csv").exists()
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    summary = cli.main(cli.parse_args(args))  # defaults from the Slurm array: task 1 of 3
    assert (summary["num_shards"], summary["shard_index"]) == (3, 1) and "missing" not in summary
    assert {m: s["generated_this_run"] for m, s in summary["methods"].items()} == dict.fromkeys(METHODS, 2)
    assert results(out) == results(reference)  # images, noises, manifest, summary and settings, byte for byte
    assert json.loads((out / "run.json").read_text())["num_shards"] == 3
    (out / "summary.json").unlink()
    code, err = run_in_process(cli, [*args, "--finalize"], capsys)
    assert code == 0, err
    assert results(out) == results(reference)


def three_tasks_one_killed(cmd: list, env: dict, started, timeout: int = 300) -> tuple[dict, dict]:
    """`cmd --num_shards 3 --shard_index i` for i = 0, 1, 2 as separate processes, task 1 killed with -9 once
    `started()` is true (its first image is there, within 300 s): the exit codes and stderr of tasks 0 and 2 (each
    given `timeout` seconds to finish)."""
    procs = {i: subprocess.Popen([*cmd, "--num_shards", "3", "--shard_index", str(i)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)) for i in range(3)}
    deadline = time.monotonic() + 300
    while procs[1].poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.005)
    procs[1].kill()
    errs = {i: procs[i].communicate(timeout=timeout)[1] for i in (0, 2)}
    procs[1].wait(timeout=60)
    assert procs[1].returncode == -signal.SIGKILL
    return {i: procs[i].returncode for i in (0, 2)}, errs


@pytest.mark.slow  # three runs at once, a kill and a rerun, as separate processes: about a minute on 2 busy cores
def test_three_machines_one_killed_equal_one_run(setup, tmp_path, capsys):
    """K = 3 runs as separate processes (no launcher, no communication) into one folder under the default flags,
    task 1 killed with -9 mid-run: the others finish and print their part; --finalize names the missing batch; task
    1 rerun alone completes the folder, which then equals one single run byte for byte (images, manifest.csv,
    summary.json, batch_settings.json)."""
    from tests.test_inference import run_in_process

    prompts = setup["root"] / "twelve.txt"  # 12 lines, line 2 blank: global batches of 4 hold 0-4, 5-8, 9-11
    prompts.write_text("\n".join([*PROMPTS, "a fox", "an owl", "a boat", "a map", "a cup", "a key"]) + "\n",
                       encoding="utf-8")
    cli = load_cli("scripts/batch_inference.py")
    required = ["--prompt_file", str(prompts), "--rnn_weights_path", str(setup["export"])]
    single, out = tmp_path / "single", tmp_path / "machines"
    cli.main(cli.parse_args([*required, "--output_base_dir", str(single)]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    # task 1 (prompts 5-8) is killed once its first image is there
    codes, errs = three_tasks_one_killed([sys.executable, str(ROOT / "scripts" / "batch_inference.py"), *required,
                                          "--output_base_dir", str(out)], env,
                                         lambda: any((out / "standard_output").glob("[5678].png")))
    for i in (0, 2):
        assert codes[i] == 0, errs[i][-3000:]
        assert f"task {i} of 3: gnsnet: {4 if i == 0 else 3} new, 0 already there" in errs[i]
    assert "global batch(es) 1;" in errs[0] + errs[2] and not (out / "summary.json").exists()
    made = [p for p in out.glob("*_output/*.png") if int(p.stem) in (5, 6, 7, 8)]
    assert 1 <= len(made) < 8  # mid-run
    code, err = run_in_process(cli, [*required, "--output_base_dir", str(out), "--finalize"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "(global batch(es) 1;" in err, err
    rerun = subprocess.run([sys.executable, str(ROOT / "scripts" / "batch_inference.py"), *required,
                            "--output_base_dir", str(out), "--num_shards", "3", "--shard_index", "1"],
                           capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert results(out) == results(single)
    assert not list(out.rglob(".*.tmp")) and not (out / ".manifest_parts").exists()


def test_manifest_parts_another_task_merges_away_meanwhile_are_skipped(tmp_path, monkeypatch):
    """K tasks share a folder: while one lists the manifest parts, another may merge them into manifest.csv and drop
    them (the sweep's tasks pass through every unit). A part gone between the listing and its reading, or the whole
    folder of parts gone while it is listed, is skipped: no FileNotFoundError, the rows still there are read."""
    import pathlib

    parts = tmp_path / ".manifest_parts"
    parts.mkdir()
    (parts / "task0-rank0-1.jsonl").write_text(json.dumps({"index": 0, "method": "standard"}) + "\n",
                                                encoding="utf-8")
    real_glob = pathlib.Path.glob
    monkeypatch.setattr(pathlib.Path, "glob", lambda self, pattern: [*real_glob(self, pattern),
                                                                     parts / "task1-rank0-2.jsonl"])  # merged away
    assert recorded_images(tmp_path) == {(0, "standard")}

    def vanished(self, pattern):
        raise FileNotFoundError(self)

    monkeypatch.setattr(pathlib.Path, "glob", vanished)
    assert recorded_images(tmp_path) == set()
