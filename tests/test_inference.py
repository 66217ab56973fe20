"""Stage 4 and the Python API: GoldenNoise on the tiny offline SDXL pipeline, and src/inference_rnn.py end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_noise.diffusion import encode_prompts, sample_images, seeded_noise
from golden_noise.golden import GoldenConfig, golden_step
from golden_noise.errors import UserError
from golden_noise.io import load_tensor
from tests.conftest import dataset_samples, load_cli, run_cli

PROMPT = "A futuristic cityscape at sunset, synthwave style"
TRAIN_GOLDEN = GoldenConfig(schedule_steps=10, denoise_guidance_scale=4.0, inversion_guidance_scale=1.0)
TRAIN_STEPS = 3


def make_export(stem: Path, pipe, pipe_dir: Path, noise_resolution: int = 16, predict_variance: bool = True,
                seed: int = 0, text_embedding: str = "auto") -> Path:
    """Save a small random NoiseSequenceRNN_v3 with the run_config stage 2 writes for `pipe` (n=3, w_l=4).

    Its change head gets random weights, so unlike a fresh model it is not the identity."""
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig

    from golden_noise.dataset.generate import GenerationSettings, build_run_config

    res = noise_resolution * pipe.vae_scale_factor
    settings = GenerationSettings(base_model_id=str(pipe_dir), num_steps=TRAIN_STEPS, golden=TRAIN_GOLDEN,
                                  height=res, width=res, text_embedding=text_embedding)
    run_config = build_run_config(pipe, settings, golden_step(pipe, TRAIN_GOLDEN))
    config = NoiseSequenceRNNConfig(latent_channels=4, noise_resolution=noise_resolution,
                                    text_embed_dim=run_config["text_embedding"]["dim"],
                                    text_proj_dim=16, cnn_base_filters=8, cnn_num_blocks=[1, 1], cnn_max_filters=16,
                                    cnn_feat_dim=16, gru_hidden_size=16, gru_num_layers=1, norm_groups=4,
                                    predict_variance=predict_variance, delta_scale=0.1)
    torch.manual_seed(seed)
    model = NoiseSequenceRNN_v3(config)
    torch.nn.init.normal_(model.mean_head.weight, std=0.2)
    model.save_pretrained(stem, extra={"run_config": run_config})
    return stem


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def export(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A run directory holding rnn_v3_model_final.{safetensors,json}."""
    run = tmp_path_factory.mktemp("rnn_run")
    make_export(run / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir)
    return run


def test_api_readme_snippet(export, tiny_pipeline):
    """The README's three lines work with a user's own pipeline, and give the RNN's rollout from the seed's x_T."""
    from golden_noise import GoldenNoise

    pipe = tiny_pipeline
    gn = GoldenNoise.from_pretrained(export, pipe=pipe)
    latents = gn(PROMPT, seed=7)
    image = pipe(PROMPT, latents=latents, num_inference_steps=3).images[0]

    assert image.size == (16, 16)
    assert latents.shape == (1, 4, 16, 16) and latents.dtype == pipe.unet.dtype
    assert gn.num_steps == TRAIN_STEPS and gn.latent_shape == (4, 16, 16)
    x_T = seeded_noise([7], (4, 16, 16))
    pooled = encode_prompts(pipe, [PROMPT], with_uncond=False).cond_pooled
    expected = gn.model.generate_sequence(x_T, pooled, TRAIN_STEPS)[:, -1]
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    change = (latents - x_T).norm() / x_T.norm()
    assert 0.01 < change < 1.0, change  # a real, modest change of the noise
    assert torch.equal(gn(PROMPT, seed=7), latents)  # deterministic
    # one seed per prompt: a sample does not depend on its batch-mates
    both = gn([PROMPT, "a red apple"], seed=[7, 8])
    torch.testing.assert_close(both[:1], latents, rtol=0, atol=1e-5)
    assert not torch.allclose(both[1:], latents)


def test_text_embedding_kinds_agree_between_stage_2_and_inference(tiny_pipeline, tiny_pipeline_dir, tmp_path):
    """--text_embedding pooled+mean_token stores [pooled, token mean over the prompt's own tokens], and an RNN
    trained on such data is fed exactly that at inference."""
    from golden_noise.inference import GoldenNoise

    prompts = ["a red circle", "a small blue square at the top left", PROMPT]
    pf = tmp_path / "p.txt"
    pf.write_text("\n".join(prompts) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    run_cli("src/generate_npd_series.py", "--prompt_file", pf, "--output_dir", out, "--base_model_id",
            tiny_pipeline_dir, "--num_steps", 1, "--device", "cpu", "--storage_dtype", "float32",
            "--text_embedding", "pooled+mean_token", "--save_prompt_embeds", check=True)
    config = json.loads((out / "run_config.json").read_text())
    assert config["text_embedding"] == {"kind": "pooled+mean_token", "dim": 32 + 64,
                                        "source": "text_encoder_2+prompt_embeds"}
    pooled = encode_prompts(tiny_pipeline, prompts, with_uncond=False).cond_pooled
    samples = dataset_samples(out)
    stored = torch.stack([samples[i]["text"] for i in range(3)])
    for i, prompt in enumerate(prompts):
        tokens = len(tiny_pipeline.tokenizer(prompt).input_ids)  # with BOS and EOS, no padding
        embeds = samples[i]["prompt_embeds"]  # (77, 64)
        torch.testing.assert_close(stored[i, :32], pooled[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stored[i, 32:], embeds[:tokens].mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stored[0, 32:], stored[1, 32:])

    stem = make_export(tmp_path / "run" / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir,
                       text_embedding="pooled+mean_token")
    gn = GoldenNoise.from_pretrained(stem, pipe=tiny_pipeline)
    assert gn.text_embedding_kind == "pooled+mean_token"
    torch.testing.assert_close(gn.text_embeddings(prompts), stored, atol=1e-5, rtol=1e-5)
    assert gn(prompts, seed=0).shape == (3, 4, 16, 16)
    with pytest.raises(UserError, match="--text_embedding pooled: this pipeline has no pooled embedding"):
        from golden_noise.diffusion import resolve_text_embedding
        tiny_pipeline.text_encoder_2, te2 = None, tiny_pipeline.text_encoder_2
        try:
            resolve_text_embedding(tiny_pipeline, "pooled")
        finally:
            tiny_pipeline.text_encoder_2 = te2


def test_api_errors(export, tiny_pipeline, tiny_pipeline_dir, tmp_path):
    from golden_noise import GoldenNoise

    with pytest.raises(UserError, match="does not exist"):
        GoldenNoise.from_pretrained(tmp_path / "nowhere")
    small = make_export(tmp_path / "small", tiny_pipeline, tiny_pipeline_dir, noise_resolution=8)
    gn_small = GoldenNoise.from_pretrained(small, pipe=tiny_pipeline)  # fine at its own resolution (8 px)
    assert (gn_small.height, gn_small.width, gn_small.latent_shape) == (8, 8, (4, 8, 8))
    with pytest.raises(UserError, match=r"trained on latents \[4, 8, 8\].*makes latents \[4, 16, 16\]"):
        gn_small.check_pipeline(tiny_pipeline, 16, 16)
    gn = GoldenNoise.from_pretrained(export)  # no pipeline yet
    with pytest.raises(UserError, match="needs a pipeline"):
        gn(PROMPT, seed=1)
    with pytest.raises(UserError, match="seed"):
        gn(PROMPT, pipe=tiny_pipeline)


def test_single_cli_end_to_end(export, tiny_pipeline, tiny_pipeline_dir, tmp_path):
    """Standard image == plain `pipe(prompt, generator=manual_seed(seed))`; gnsnet/oracle images come from the
    saved noises; the oracle is the golden step of the RNN's training data applied n times; settings recorded."""
    out = tmp_path / "single"
    seed, steps, scale = 12345, 4, 5.5
    cli = load_cli("src/inference_rnn.py")  # in process (the subprocess path is run in test_single_cli_bad_inputs)
    returned = cli.main(cli.parse_args([str(a) for a in (
        "--rnn_weights_path", export / "rnn_v3_model_final.safetensors", "--prompt", PROMPT, "--output_dir", out,
        "--output_name", "x", "--num_inference_steps", steps, "--guidance_scale", scale, "--seed", seed,
        "--generate_standard", "--generate_oracle", "--save_noise", "--device", "cpu")]))
    settings = json.loads((out / "x_settings.json").read_text())
    assert settings == json.loads(json.dumps(returned))
    assert settings["base_model_id_used"] == str(tiny_pipeline_dir)  # read from the export, not retyped
    assert settings["num_gen_steps_used"] == TRAIN_STEPS and settings["seed"] == seed
    assert settings["num_inference_steps"] == steps and settings["scheduler_class"] == "DDIMScheduler"
    assert settings["oracle_golden"] == TRAIN_GOLDEN.to_dict()
    assert settings["rnn_run_config"]["num_steps"] == TRAIN_STEPS
    # the export's identity (issue 20 item 4): the weights' sha256 and the sha256 of its config's canonical JSON
    from golden_noise.export import config_sha256, file_sha256

    weights = export / "rnn_v3_model_final.safetensors"
    assert settings["rnn_sha256"] == file_sha256(weights) and settings["rnn_weights_file"] == str(weights.resolve())
    assert settings["rnn_config_sha256"] == config_sha256(json.loads(weights.with_suffix(".json").read_text()))
    assert settings["timings"]["rollout_seconds"] > 0 and settings["timings"]["gnsnet_sampling_seconds"] > 0
    assert set(settings["files"]) == {"gnsnet", "standard", "oracle", "source_noise", "golden_noise", "oracle_noise"}

    pipe = tiny_pipeline
    plain = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                 guidance_scale=scale).images[0]
    assert np.array_equal(pixels(out / "x_standard.png"), np.asarray(plain.convert("RGB")))

    x_T = load_tensor(out / "x_source_noise.pt")
    assert torch.equal(x_T, seeded_noise([seed], (4, 16, 16))[0])
    golden = load_tensor(out / "x_golden_noise.pt")
    from golden_noise import GoldenNoise

    torch.testing.assert_close(golden[None], GoldenNoise.from_pretrained(export, pipe=pipe)(PROMPT, seed=seed),
                               rtol=0, atol=1e-5)
    oracle = load_tensor(out / "x_oracle_noise.pt")
    step = golden_step(pipe, TRAIN_GOLDEN)
    expected = step.sequence(x_T[None], encode_prompts(pipe, [PROMPT]), TRAIN_STEPS)[:, -1]
    torch.testing.assert_close(oracle[None], expected, rtol=0, atol=1e-5)
    for name, z in (("gnsnet", golden), ("oracle", oracle)):
        image = sample_images(pipe, [PROMPT], z[None], steps, scale)[0]
        diff = np.abs(pixels(out / f"x_{name}.png").astype(int) - np.asarray(image.convert("RGB")).astype(int))
        assert diff.max() <= 1, name  # same noise -> same image (up to float rounding at a uint8 boundary)
    assert not np.array_equal(pixels(out / "x_gnsnet.png"), pixels(out / "x_standard.png"))


def test_single_in_process_scheduler_and_sampling(export, tiny_pipeline_dir, tmp_path):
    """--scheduler swaps the sampler; --sample_noise draws from the predicted Gaussian (seeded, so repeatable)."""
    cli = load_cli("src/inference_rnn.py")
    common = ["--rnn_weights_path", str(export), "--prompt", PROMPT, "--num_inference_steps", "2", "--device", "cpu"]
    mean = cli.main(cli.parse_args([*common, "--output_dir", str(tmp_path / "a"), "--save_noise",
                                    "--scheduler", "dpmsolver++"]))
    assert mean["scheduler_class"] == "DPMSolverMultistepScheduler"
    s1 = cli.main(cli.parse_args([*common, "--output_dir", str(tmp_path / "b"), "--save_noise", "--sample_noise"]))
    s2 = cli.main(cli.parse_args([*common, "--output_dir", str(tmp_path / "c"), "--save_noise", "--sample_noise",
                                  "--num_gen_steps", "2"]))
    load = lambda d, s: load_tensor(tmp_path / d / s["files"]["golden_noise"])  # noqa: E731
    assert not torch.allclose(load("a", mean), load("b", s1))
    assert s2["num_gen_steps_used"] == 2


def test_single_cli_bad_inputs(export, tiny_pipeline, tiny_pipeline_dir, tmp_path, capsys):
    missing = tmp_path / "no_run"
    proc = run_cli("src/inference_rnn.py", "--rnn_weights_path", missing, "--prompt", PROMPT,
                   "--output_dir", tmp_path / "o")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and str(missing) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr

    cli = load_cli("src/inference_rnn.py")
    small = make_export(tmp_path / "small", tiny_pipeline, tiny_pipeline_dir, noise_resolution=8)
    args = cli.parse_args(["--rnn_weights_path", str(small), "--prompt", PROMPT, "--height", "16", "--width", "16",
                           "--base_model_id", str(tiny_pipeline_dir), "--output_dir", str(tmp_path / "o"),
                           "--device", "cpu"])
    with pytest.raises(UserError, match=r"latents \[4, 8, 8\].*--height/--width"):
        cli.main(args)
    no_var = make_export(tmp_path / "novar", tiny_pipeline, tiny_pipeline_dir, predict_variance=False)
    with pytest.raises(UserError, match="--sample_noise needs"):
        cli.main(cli.parse_args(["--rnn_weights_path", str(no_var), "--prompt", PROMPT, "--sample_noise",
                                 "--device", "cpu", "--output_dir", str(tmp_path / "o")]))
    with pytest.raises(UserError, match="--prompt is empty"):
        cli.main(cli.parse_args(["--rnn_weights_path", str(export), "--prompt", "  ", "--device", "cpu",
                                 "--output_dir", str(tmp_path / "o")]))
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--rnn_weights_path", str(export), "--prompt", PROMPT, "--scheduler", "plms"])
    assert e.value.code == 2 and "invalid choice: 'plms'" in capsys.readouterr().err
    assert not list((tmp_path / "o").rglob("*"))  # nothing half-written (the checked folder stays empty)


def run_in_process(cli, argv: list, capsys) -> tuple[int, str]:
    """A CLI's exit code and stderr through golden_noise.runtime.run_cli, in process (as `python script` runs it)."""
    from golden_noise.runtime import run_cli as run_main

    capsys.readouterr()
    code = run_main(cli.main, cli.parse_args, [str(a) for a in argv])
    return code, capsys.readouterr().err


def test_load_pipeline_dtype_kwarg_and_memory_flags(tiny_pipeline_dir):
    """The dtype really reaches the weights (float16 on CPU), through the keyword the installed diffusers honours
    (`dtype` from 0.40, `torch_dtype` before; no deprecation warning); 'auto' is float32 off CUDA; VAE slicing and
    tiling are switched on; model offload on CPU is a one-line error before loading."""
    import warnings

    from golden_noise.diffusion import dtype_keyword, load_pipeline

    assert [dtype_keyword(v) for v in ("0.35.0", "0.39.0", "0.40.0", "0.42.1", "1.0.0.dev0")] == \
        ["torch_dtype", "torch_dtype", "dtype", "dtype", "dtype"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = load_pipeline(str(tiny_pipeline_dir), dtype="float16", device="cpu", vae_slicing=True, vae_tiling=True)
    assert not [w for w in caught if "dtype" in str(w.message)], [str(w.message) for w in caught]
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert {p.dtype for p in getattr(half, name).parameters()} == {torch.float16}, name
    assert half.vae.use_slicing and half.vae.use_tiling
    auto = load_pipeline(str(tiny_pipeline_dir), dtype="auto", device="cpu")
    assert {p.dtype for p in auto.unet.parameters()} == {torch.float32} and not auto.vae.use_slicing
    with pytest.raises(UserError, match="--enable_model_cpu_offload moves each model to the GPU.*device is cpu"):
        load_pipeline(str(tiny_pipeline_dir), device="cpu", cpu_offload=True)


def test_single_guidance_at_most_one_is_no_guidance(export, tmp_path, capsys):
    """--guidance_scale 0.5 gives the --guidance_scale 1 image, says so in the log and records the effective value;
    the default --dtype auto is float32 on CPU."""
    cli = load_cli("src/inference_rnn.py")
    common = ["--rnn_weights_path", str(export), "--prompt", PROMPT, "--num_inference_steps", "2", "--device", "cpu",
              "--generate_standard", "--output_name", "x"]
    low = cli.main(cli.parse_args([*common, "--guidance_scale", "0.5", "--output_dir", str(tmp_path / "low")]))
    assert "--guidance_scale 0.5 <= 1: diffusers applies no classifier-free guidance" in capsys.readouterr().err
    one = cli.main(cli.parse_args([*common, "--guidance_scale", "1", "--output_dir", str(tmp_path / "one")]))
    cfg = cli.main(cli.parse_args([*common, "--output_dir", str(tmp_path / "cfg")]))
    effective = ("guidance_scale", "guidance_scale_effective", "classifier_free_guidance")
    assert [low[k] for k in effective] == [0.5, 1.0, False]
    assert [one[k] for k in effective] == [1.0, 1.0, False]
    assert [cfg[k] for k in effective] == [5.5, 5.5, True]
    assert low["dtype"] == "auto" and low["dtype_used"] == "float32"
    saved = json.loads((tmp_path / "low" / "x_settings.json").read_text())
    assert saved["guidance_scale_effective"] == 1.0 and saved["classifier_free_guidance"] is False
    for method in ("standard", "gnsnet"):
        low_pixels = pixels(tmp_path / "low" / f"x_{method}.png")
        assert np.array_equal(low_pixels, pixels(tmp_path / "one" / f"x_{method}.png"))
        assert not np.array_equal(low_pixels, pixels(tmp_path / "cfg" / f"x_{method}.png"))


def test_single_one_line_errors_before_any_model(tmp_path, capsys):
    """Negative guidance and unwritable --output_dir (/proc, below a regular file) fail with one line, exit 2, before
    the RNN or the pipeline is loaded (the export path here does not even exist)."""
    cli = load_cli("src/inference_rnn.py")
    base = ["--rnn_weights_path", tmp_path / "no_such_run", "--prompt", PROMPT, "--device", "cpu"]
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    negative = "error: --guidance_scale must not be negative"
    cases = [(["--guidance_scale", "-1", "--output_dir", tmp_path / "o"], negative),
             (["--guidance_scale", "nan", "--output_dir", tmp_path / "o"],
              "error: argument --guidance_scale: must be a finite number, got nan"),
             (["--output_dir", "/proc/x"], "error: --output_dir /proc/x is not a writable folder"),
             (["--output_dir", a_file / "sub"], f"error: --output_dir {a_file / 'sub'} is not a writable folder")]
    for extra, message in cases:
        code, err = run_in_process(cli, [*base, *extra], capsys)
        assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "x" and not (tmp_path / "o").exists()


def test_oracle_api_refuses_negative_guidance(tiny_pipeline):
    from golden_noise.inference import oracle_noise

    x_T = seeded_noise([0], (4, 16, 16))
    for bad in (GoldenConfig(denoise_guidance_scale=-1.0), GoldenConfig(inversion_guidance_scale=-0.5)):
        with pytest.raises(UserError, match=r"--(denoise|inversion)_guidance_scale must not be negative"):
            oracle_noise(tiny_pipeline, [PROMPT], x_T, 1, bad)


def test_single_seed_spellings(export, tiny_pipeline, tiny_pipeline_dir, tmp_path, capsys):
    """`--rnn_weights_path .../rnn_v3_model_final.pth` means the safetensors export (said in the log; a pickle there
    is never loaded); `--predict_variance` is accepted when the export has the variance head, refused otherwise."""
    cli = load_cli("src/inference_rnn.py")
    common = ["--prompt", PROMPT, "--num_inference_steps", "2", "--device", "cpu", "--output_dir", str(tmp_path / "o")]
    settings = cli.main(cli.parse_args(["--rnn_weights_path", str(export / "rnn_v3_model_final.pth"),
                                        "--predict_variance", "--save_noise", *common]))
    assert ".pth means the safetensors export" in capsys.readouterr().err
    assert settings["rnn_weights_file"] == str((export / "rnn_v3_model_final.safetensors").resolve())
    golden = load_tensor(tmp_path / "o" / settings["files"]["golden_noise"])
    from golden_noise import GoldenNoise

    torch.testing.assert_close(golden[None], GoldenNoise.from_pretrained(export, pipe=tiny_pipeline)(PROMPT, seed=42),
                               rtol=0, atol=1e-5)
    no_var = make_export(tmp_path / "novar" / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir,
                         predict_variance=False)
    cli.main(cli.parse_args(["--rnn_weights_path", str(no_var.parent), *common]))  # no flag: no check
    with pytest.raises(UserError, match=r"--predict_variance was given, but the RNN export .*novar.* was trained "
                                        r"without it"):
        cli.main(cli.parse_args(["--rnn_weights_path", str(no_var.parent), "--predict_variance", *common]))
    pickle = tmp_path / "seed_run" / "rnn_v3_model_final.pth"
    pickle.parent.mkdir()
    pickle.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UserError, match=r"is a pickle, which is never loaded"):
        cli.main(cli.parse_args(["--rnn_weights_path", str(pickle), *common]))


def test_output_name_must_be_a_plain_file_name(export, tiny_pipeline_dir, tmp_path, capsys):
    """Issue 20 item 5: --output_name names the files inside --output_dir; one with a path separator or '..' (which
    wrote `../x_gnsnet.png` outside it) is a one-line error before any model loads, and nothing is written. A plain
    name still works."""
    cli = load_cli("src/inference_rnn.py")
    out = tmp_path / "deep" / "out"
    base = ["--rnn_weights_path", export, "--prompt", PROMPT, "--output_dir", out, "--base_model_id",
            tiny_pipeline_dir, "--num_inference_steps", 2, "--device", "cpu"]
    for name in ("../x", "..", "sub/x", "a\\b", "", " "):
        code, err = run_in_process(cli, [*base, "--output_name", name], capsys)
        assert code == 2 and err.startswith(f"error: --output_name {name!r} is not a plain file name"), err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "deep").exists() and not list(tmp_path.rglob("*.png"))
    code, err = run_in_process(cli, [*base, "--output_name", "..x"], capsys)  # a name, if an odd one
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["..x_gnsnet.png", "..x_settings.json"]
