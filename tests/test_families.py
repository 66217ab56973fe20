"""Model families beyond SDXL on tiny offline pipelines: SD 1.5 (epsilon), SD 2.1 (v-prediction), SD3 with and
without its T5 encoder (flow matching), FLUX.1 [dev] (guidance-distilled, packed latents), and a separate sampler.

For each family: the golden step equals a hand-written reference (the DDIM formulas / the flow contract written
out here) and its closed form; `standard` is pixel-equal to plain diffusers with the same seed; a two-step dataset
trains and rolls out (stage 2 -> stage 3 -> stage 5 with gnsnet). One module-scoped pipeline per family.
"""
from __future__ import annotations

import json
import math
import numpy as np
import pytest
import torch

from golden_noise.diffusion import encode_prompts, family_of, load_pipeline, seeded_noise
from golden_noise.errors import UserError
from golden_noise.golden import GoldenConfig, golden_step
from golden_noise.io import load_tensor
from tests.conftest import dataset_samples, load_cli
from tests.test_inference import pixels

FAMILIES = {  # id: (builder family, builder kwargs, expected family name, prediction type, latent shape, size)
    "sd15_eps": ("sd", {}, "sd", "epsilon", (4, 16, 16), None),
    "sd21_v": ("sd", {"prediction_type": "v_prediction"}, "sd", "v_prediction", (4, 16, 16), None),
    "sd3_t5": ("sd3", {}, "sd3", "flow", (16, 16, 16), None),
    "sd3_no_t5": ("sd3", {"with_t5": False}, "sd3", "flow", (16, 16, 16), None),
    "flux": ("flux", {}, "flux", "flow", (4, 16, 16), 16),  # FLUX's default size is 128 px: pass 16
}
PROMPTS = ["a small red circle at the top", "a big blue square"]
SEEDS = [5, 6]
TINY_ARCH = ["--cnn_base_filters", "8", "--cnn_num_blocks", "1", "1", "--cnn_feat_dim", "16", "--gru_hidden_size",
             "16", "--gru_num_layers", "1", "--text_proj_dim", "16", "--norm_groups", "4",
             "--dataloader_num_workers", "0"]


@pytest.fixture(scope="module", params=list(FAMILIES))
def fam(request, tmp_path_factory):
    """(id, pipeline dir, pipeline loaded through the project's loader, spec) of one family."""
    from golden_noise.testing.pipelines import save_tiny_pipeline

    builder, kwargs, *_ = FAMILIES[request.param]
    path = save_tiny_pipeline(tmp_path_factory.mktemp(request.param) / "pipe", builder, seed=0, **kwargs)
    return request.param, path, load_pipeline(str(path), dtype="float32", device="cpu"), FAMILIES[request.param]


def size_kwargs(spec) -> dict:
    return {"height": spec[5], "width": spec[5]} if spec[5] else {}


def test_family_chosen_from_the_pipeline(fam):
    """The registry picks the family from the loaded pipeline; shapes, latent space and text embeddings follow."""
    name, path, pipe, spec = fam
    family = family_of(pipe)
    assert (family.name, family.prediction_type) == (spec[2], spec[3])
    assert family.latent_shape(spec[5], spec[5]) == spec[4]
    space = family.latent_space()
    assert space["family"] == spec[2] and space["latent_channels"] == spec[4][0] and len(space["fingerprint"]) == 16
    if name == "sd3_no_t5":  # saved with text_encoder_3=None: it loads, and T5's part of the conditioning is zero
        assert pipe.text_encoder_3 is None and json.loads((path / "model_index.json").read_text())["text_encoder_3"] \
            == [None, None]
    cond = encode_prompts(pipe, PROMPTS, **size_kwargs(spec))
    spec_auto = family.text_embedding_spec("auto")
    if spec[2] == "sd":  # no pooled embedding: auto = the token mean over the prompt's own tokens
        assert spec_auto == {"kind": "mean_token", "dim": 32, "source": "prompt_embeds"}
        with pytest.raises(UserError, match="no pooled embedding"):
            family.text_embedding_spec("pooled")
        tokens = len(pipe.tokenizer(PROMPTS[0]).input_ids)
        torch.testing.assert_close(family.text_embedding(PROMPTS, cond, "auto")[0],
                                   cond.cond_embeds[0, :tokens].mean(0), atol=1e-6, rtol=1e-6)
    elif spec[2] == "sd3":  # pooled = pooled_projections (CLIP-L + CLIP-G projections), tokens = the CLIP part
        _, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False)
        assert spec_auto["kind"] == "pooled" and spec_auto["dim"] == 64
        torch.testing.assert_close(family.text_embedding(PROMPTS, cond, "pooled"), pooled)
        tokens = len(pipe.tokenizer(PROMPTS[1]).input_ids)
        both = family.text_embedding(PROMPTS, cond, "pooled+mean_token")
        torch.testing.assert_close(both[1, 64:], cond.cond_embeds[1, :tokens, :64].mean(0), atol=1e-6, rtol=1e-6)
        t5 = cond.cond_embeds[:, 77:]
        assert (t5.abs().sum() == 0) == (name == "sd3_no_t5")
    else:  # FLUX: pooled = CLIP's pooled output, tokens = T5 over its own tokens
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu")
        torch.testing.assert_close(family.text_embedding(PROMPTS, cond, "pooled"), pooled)
        tokens = len(pipe.tokenizer_2(PROMPTS[0]).input_ids)
        torch.testing.assert_close(family.text_embedding(PROMPTS, cond, "mean_token")[0], embeds[0, :tokens].mean(0),
                                   atol=1e-6, rtol=1e-6)


def _cfg(pipe, forward, x, w):
    """v_u + w (v_c - v_u) written out: each branch through its own plain forward."""
    if w == 1.0:
        return forward(x, "cond")
    u, c = forward(x, "uncond"), forward(x, "cond")
    return u + w * (c - u)


def _ddim_reference(pipe, x, w_l, w_w, n_steps=10):
    """DDIM denoise at t0 then DDIM inversion back to t0 (model at (x_prev, t0)), the formulas written out."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    a = sched.alphas_cumprod
    t0, tp = 901, 801
    a_t, a_p = a[t0].item(), a[tp].item()
    neg, pos = pipe.encode_prompt(PROMPTS, "cpu", 1, True)[::-1]  # (cond, uncond) -> (uncond, cond)
    emb = {"uncond": neg, "cond": pos}

    def fwd(z, which):
        return pipe.unet(z, t0, encoder_hidden_states=emb[which]).sample

    v_pred = sched.config.prediction_type == "v_prediction"
    out_l = _cfg(pipe, fwd, x, w_l)
    if v_pred:
        x0, eps = math.sqrt(a_t) * x - math.sqrt(1 - a_t) * out_l, math.sqrt(a_t) * out_l + math.sqrt(1 - a_t) * x
    else:
        x0, eps = (x - math.sqrt(1 - a_t) * out_l) / math.sqrt(a_t), out_l
    x_prev = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    out_w = _cfg(pipe, fwd, x_prev, w_w)
    if v_pred:
        x0 = math.sqrt(a_p) * x_prev - math.sqrt(1 - a_p) * out_w
        eps = math.sqrt(a_p) * out_w + math.sqrt(1 - a_p) * x_prev
    else:
        x0, eps = (x_prev - math.sqrt(1 - a_p) * out_w) / math.sqrt(a_p), out_w
    closed = x - (math.sqrt(1 - a_t) - math.sqrt(a_t / a_p) * math.sqrt(1 - a_p)) * (out_l - out_w)
    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps, closed


def _flow_reference(pipe, name, x, w_l, w_w, n_steps=10, size=None):
    """The rectified-flow contract written out, with the scheduler's own sigmas/timesteps for N steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if name == "flux":  # FluxPipeline's own schedule: linspace sigmas, shifted by the image's token count
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        mu = calculate_shift((x.shape[-2] // 2) * (x.shape[-1] // 2), 256, 4096, 0.5, 1.15)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / n_steps, n_steps), mu=mu)
        embeds, pooled, txt_ids = pipe.encode_prompt(PROMPTS, device="cpu")
        b, c, h, w = x.shape
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", x.dtype)

        def v(z, t, g):
            out = pipe.transformer(hidden_states=pipe._pack_latents(z, b, c, h, w), timestep=t.expand(b) / 1000,
                                   guidance=torch.full([b], g), pooled_projections=pooled,
                                   encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids).sample
            return pipe._unpack_latents(out, h, w, pipe.vae_scale_factor)
    else:
        sched.set_timesteps(n_steps)
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu")
        emb = {"uncond": (neg, neg_pooled), "cond": (pos, pooled)}

        def v(z, t, g):
            def fwd(zz, which):
                return pipe.transformer(hidden_states=zz, timestep=t.expand(zz.shape[0]),
                                        encoder_hidden_states=emb[which][0], pooled_projections=emb[which][1]).sample
            return _cfg(pipe, fwd, z, g)
    s0, s1 = sched.sigmas[0].item(), sched.sigmas[1].item()
    t0, t1 = sched.timesteps[0], sched.timesteps[1]
    assert s0 > s1
    v_l = v(x, t0, w_l)
    x_prev = x + (s1 - s0) * v_l
    v_w = v(x_prev, t1, w_w)
    return x_prev + (s0 - s1) * v_w, x - (s0 - s1) * (v_l - v_w)


@pytest.mark.parametrize("w_w", [1.0, 2.0])
def test_golden_step_equals_the_written_reference(fam, w_w):
    """The family's golden step = the reference formulas and the closed form; rows counted per branch needed."""
    name, _, pipe, spec = fam
    family = family_of(pipe)
    size = spec[5]
    step = golden_step(pipe, GoldenConfig(10, 5.5, w_w), size, size)
    x = seeded_noise(SEEDS, family.latent_shape(size, size))
    with torch.no_grad():
        got = step(x, encode_prompts(pipe, PROMPTS, height=size, width=size))
        if spec[2] == "sd":
            ref, closed = _ddim_reference(pipe, x, 5.5, w_w)
            rows = 3 if w_w == 1.0 else 4
            if spec[3] == "epsilon":
                assert step.coefficient == pytest.approx(0.3853, abs=1e-3)
        else:
            ref, closed = _flow_reference(pipe, name, x, 5.5, w_w)
            rows = 2 if name == "flux" else (3 if w_w == 1.0 else 4)  # FLUX: guidance is an embedding, one row
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-5)
    if spec[3] != "v_prediction":  # v-prediction has no such closed form
        torch.testing.assert_close(got, closed, atol=2e-5, rtol=1e-5)
    assert step.counter.rows == rows * len(PROMPTS)
    assert 0 < ((got - x).norm() / x.norm()).item() < 0.5


@pytest.fixture(scope="module")
def e2e(fam, tmp_path_factory):
    """Stage 2 (n = 2) -> stage 3 (a few steps) -> stage 5 (standard, gnsnet, oracle) in process, for one family."""
    name, path, pipe, spec = fam
    root = tmp_path_factory.mktemp(f"{name}_e2e")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 2) + "\n", encoding="utf-8")
    size = ["--height", str(spec[5]), "--width", str(spec[5])] if spec[5] else []
    gen = load_cli("src/generate_npd_series.py")
    gen.main(gen.parse_args(["--prompt_file", str(prompts), "--output_dir", str(root / "ds"), "--base_model_id",
                             str(path), "--num_steps", "2", "--batch_size", "2", "--device", "cpu", "--storage_dtype",
                             "float32", "--schedule_steps", "10", "--denoise_guidance_scale", "5.5", *size]))
    train = load_cli("src/train_rnn_model_v3.py")
    train.main(train.parse_args(["--dataset_dir", str(root / "ds"), "--output_dir", str(root / "run"),
                                 "--max_train_steps", "3", "--batch_size", "2", "--validation_fraction", "0.25",
                                 "--report_to", "none", *TINY_ARCH]))
    batch = load_cli("scripts/batch_inference.py")
    out = root / "images"
    summary = batch.main(batch.parse_args(["--prompt_file", str(prompts), "--output_base_dir", str(out),
                                           "--rnn_weights_path", str(root / "run"), "--methods", "standard", "gnsnet",
                                           "oracle", "--batch_size", "2", "--num_inference_steps", "2",
                                           "--guidance_scale", "3.0", "--start_seed", "100", "--device", "cpu",
                                           "--save_noise"]))
    return {"root": root, "images": out, "summary": summary}


def test_two_step_dataset_trains_and_rolls_out(fam, e2e):
    """Stage 2's dataset has the family's shapes and records it; the export rolls out; stage 5 writes every image."""
    from golden_noise import GoldenNoise

    name, _, pipe, spec = fam
    run_config = json.loads((e2e["root"] / "ds" / "run_config.json").read_text())
    assert run_config["family"]["name"] == spec[2] and run_config["family"]["prediction_type"] == spec[3]
    assert run_config["latent_space"] == family_of(pipe).latent_space()
    assert run_config["latent_shape"] == list(spec[4])
    assert dataset_samples(e2e["root"] / "ds")[0]["golden"].shape == (2, *spec[4])
    assert all(m["images"] == 4 for m in e2e["summary"]["methods"].values())
    gn = GoldenNoise.from_pretrained(e2e["root"] / "run", pipe=pipe)
    latents = gn(PROMPTS[0], seed=100)  # prompt 0 has seed start_seed + 0
    saved = load_tensor(e2e["images"] / "noise" / "gnsnet" / "0.pt")
    unpacked = latents if name != "flux" else family_of(pipe).unpack(latents, *spec[4][1:])
    torch.testing.assert_close(unpacked[0], saved, atol=1e-6, rtol=1e-6)
    settings = json.loads((e2e["images"] / "batch_settings.json").read_text())
    assert settings["family"]["name"] == spec[2] and settings["latent_shape"] == list(spec[4])


def test_standard_is_pixel_equal_to_plain_diffusers(fam, e2e):
    """standard_output/{i}.png == pipe(prompts, generator=[manual_seed(start_seed + i)]) for its batch, and gnsnet's
    image == pipe(prompts, latents=its saved golden noise) (packed for FLUX)."""
    name, _, pipe, spec = fam
    kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0, **size_kwargs(spec)}
    images = pipe(PROMPTS, generator=[torch.Generator().manual_seed(100 + i) for i in range(2)], **kwargs).images
    golden = torch.stack([load_tensor(e2e["images"] / "noise" / "gnsnet" / f"{i}.pt") for i in range(2)])
    golden = family_of(pipe).pipeline_latents(golden, spec[5] or 16, spec[5] or 16)
    from_golden = pipe(PROMPTS, latents=golden, **kwargs).images
    for i in range(2):
        assert np.array_equal(pixels(e2e["images"] / "standard_output" / f"{i}.png"), np.asarray(images[i])), i
        assert np.array_equal(pixels(e2e["images"] / "gnsnet_output" / f"{i}.png"), np.asarray(from_golden[i])), i
    oracle = torch.stack([load_tensor(e2e["images"] / "noise" / "oracle" / f"{i}.pt") for i in range(2)])
    step = golden_step(pipe, GoldenConfig(10, 5.5, 1.0), spec[5], spec[5])
    x_T = seeded_noise([100, 101], family_of(pipe).latent_shape(spec[5], spec[5]))
    expected = step.sequence(x_T, encode_prompts(pipe, PROMPTS, height=spec[5], width=spec[5]), 2)[:, -1]
    torch.testing.assert_close(oracle, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- a separate sampler (SDXL base -> another UNet/LoRA)
@pytest.fixture(scope="module")
def sampler_setup(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory):
    """An SDXL-trained RNN export, a Lightning-style UNet state dict, a LoRA, and pipelines of other latent spaces."""
    from safetensors.torch import save_file

    from golden_noise.testing.pipelines import build_tiny_sdxl_pipeline, save_tiny_pipeline
    from tests.test_inference import make_export

    root = tmp_path_factory.mktemp("sampler")
    make_export(root / "run" / "rnn_v3_model_final", tiny_pipeline, tiny_pipeline_dir)
    other_unet = build_tiny_sdxl_pipeline(seed=7).unet
    save_file({k: v.contiguous() for k, v in other_unet.state_dict().items()}, root / "fast_unet.safetensors")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return {"root": root, "other_unet": other_unet, "sd": save_tiny_pipeline(root / "sd", "sd"),
            "base_dir": tiny_pipeline_dir}


def _batch(setup, out, *extra):
    batch = load_cli("scripts/batch_inference.py")
    return batch.main(batch.parse_args(["--prompt_file", str(setup["root"] / "prompts.txt"), "--output_base_dir",
                                        str(out), "--rnn_weights_path", str(setup["root"] / "run"), "--batch_size",
                                        "2", "--num_inference_steps", "2", "--guidance_scale", "1.0",
                                        "--start_seed", "100", "--device", "cpu", "--save_noise", *map(str, extra)]))


def test_separate_sampler_unet_state_dict(sampler_setup, tiny_pipeline):
    """--sampling_unet FILE.safetensors --scheduler euler --timestep_spacing trailing: images come from the base
    pipeline with that UNet and scheduler (pixel-equal to plain diffusers), the noises from the base UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from tests.test_inference import TRAIN_GOLDEN

    out = sampler_setup["root"] / "unet_out"
    _batch(sampler_setup, out, "--methods", "standard", "gnsnet", "oracle", "--sampling_unet",
           sampler_setup["root"] / "fast_unet.safetensors", "--scheduler", "euler", "--timestep_spacing", "trailing")
    ref = StableDiffusionXLPipeline.from_pipe(tiny_pipeline, unet=sampler_setup["other_unet"])
    ref.scheduler = EulerDiscreteScheduler.from_config(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    ref.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "guidance_scale": 1.0}
    standard = ref(PROMPTS, generator=[torch.Generator().manual_seed(100 + i) for i in range(2)], **kwargs).images
    noise = {m: torch.stack([load_tensor(out / "noise" / m / f"{i}.pt") for i in range(2)]) for m in ("gnsnet", "oracle")}
    golden = ref(PROMPTS, latents=noise["gnsnet"], **kwargs).images
    for i in range(2):
        assert np.array_equal(pixels(out / "standard_output" / f"{i}.png"), np.asarray(standard[i]))
        assert np.array_equal(pixels(out / "gnsnet_output" / f"{i}.png"), np.asarray(golden[i]))
    base_standard = tiny_pipeline(PROMPTS, generator=[torch.Generator().manual_seed(100 + i) for i in range(2)],
                                  **kwargs).images
    assert not np.array_equal(np.asarray(base_standard[0]), np.asarray(standard[0]))  # the swap changed the sampler
    step = golden_step(tiny_pipeline, TRAIN_GOLDEN)  # the oracle: the base UNet
    x_T = seeded_noise([100, 101], (4, 16, 16))
    expected = step.sequence(x_T, encode_prompts(tiny_pipeline, PROMPTS), 3)[:, -1]
    torch.testing.assert_close(noise["oracle"], expected, atol=1e-6, rtol=1e-6)
    settings = json.loads((out / "batch_settings.json").read_text())
    assert settings["scheduler_class"] == "EulerDiscreteScheduler" and settings["timestep_spacing"] == "trailing"
    assert settings["sampler"]["name"] == "sdxl" and settings["sampling_unet"].endswith("fast_unet.safetensors")
    with pytest.raises(UserError, match="sampling_unet"):  # a rerun with another sampler is refused
        _batch(sampler_setup, out, "--methods", "standard", "--scheduler", "euler", "--timestep_spacing", "trailing")


def test_separate_sampler_lora_is_fused(sampler_setup, tiny_pipeline):
    """--sampling_lora: the LoRA is fused into the sampler's own copy of the UNet; the images match the LoRA run
    unfused by diffusers (up to float rounding), the base pipeline is untouched."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = sampler_setup["root"]
    unet = copy.deepcopy(tiny_pipeline.unet)
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    StableDiffusionXLPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(unet))
    out = root / "lora_out"
    _batch(sampler_setup, out, "--methods", "standard", "--sampling_lora", root / "lora")
    ref = StableDiffusionXLPipeline.from_pipe(tiny_pipeline, unet=unet)  # LoRA layers active, not fused
    ref.set_progress_bar_config(disable=True)
    images = ref(PROMPTS, generator=[torch.Generator().manual_seed(100 + i) for i in range(2)],
                 num_inference_steps=2, guidance_scale=1.0).images
    base = tiny_pipeline(PROMPTS, generator=[torch.Generator().manual_seed(100 + i) for i in range(2)],
                         num_inference_steps=2, guidance_scale=1.0).images
    got = pixels(out / "standard_output" / "0.png").astype(int)
    assert np.abs(got - np.asarray(images[0]).astype(int)).max() <= 1
    assert np.abs(got - np.asarray(base[0]).astype(int)).max() > 1
    assert not any("lora" in n for n, _ in tiny_pipeline.unet.named_parameters())


def test_mismatched_sampler_is_refused(sampler_setup, tiny_pipeline):
    """A sampler of another latent space (SD 1.5 for an SDXL-trained RNN) is refused with one line naming both,
    through stage 5 (before any image) and the API."""
    from golden_noise import GoldenNoise

    out = sampler_setup["root"] / "mismatch"
    with pytest.raises(UserError) as err:
        _batch(sampler_setup, out, "--methods", "standard", "gnsnet", "--sampling_model_id", sampler_setup["sd"])
    message = str(err.value)
    assert "\n" not in message and "another latent space" in message
    assert "[sd, 4 channels" in message and "[sdxl, 4 channels" in message
    assert not (out / "standard_output").exists() and not (out / "batch_settings.json").exists()
    gn = GoldenNoise.from_pretrained(sampler_setup["root"] / "run", pipe=tiny_pipeline)
    sd = load_pipeline(str(sampler_setup["sd"]), device="cpu")
    with pytest.raises(UserError, match=r"another latent space .*\[sd, 4 channels.*scaling_factor 0.18215"):
        gn(PROMPTS[0], seed=0, sampler=sd)
    assert gn(PROMPTS[0], seed=0, sampler=tiny_pipeline).shape == (1, 4, 16, 16)


def test_stage_4_runs_each_family(fam, e2e, tmp_path):
    """src/inference_rnn.py on the family's export: its standard image equals stage 5's for the same prompt and seed,
    and the settings record the family."""
    name, _, pipe, spec = fam
    cli = load_cli("src/inference_rnn.py")
    settings = cli.main(cli.parse_args(["--rnn_weights_path", str(e2e["root"] / "run"), "--prompt", PROMPTS[0],
                                        "--seed", "100", "--output_dir", str(tmp_path), "--output_name", "x",
                                        "--num_inference_steps", "2", "--guidance_scale", "3.0", "--device", "cpu",
                                        "--generate_standard", "--generate_oracle"]))
    assert settings["family"]["name"] == spec[2] and settings["latent_shape"] == list(spec[4])
    assert np.array_equal(pixels(tmp_path / "x_standard.png"), pixels(e2e["images"] / "standard_output" / "0.png"))
    assert np.array_equal(pixels(tmp_path / "x_oracle.png"), pixels(e2e["images"] / "oracle_output" / "0.png"))


def test_stage_4_with_another_pipeline_as_sampler(sampler_setup, tiny_pipeline, tmp_path):
    """--sampling_model_id: another pipeline of the same latent space samples the images (pixel-equal to it with the
    same seed), the RNN's noise still comes from the base model."""
    from golden_noise.testing.pipelines import save_tiny_sdxl_pipeline

    other_dir = save_tiny_sdxl_pipeline(tmp_path / "other", seed=3)
    other = load_pipeline(str(other_dir), device="cpu")
    cli = load_cli("src/inference_rnn.py")
    settings = cli.main(cli.parse_args(["--rnn_weights_path", str(sampler_setup["root"] / "run"), "--prompt",
                                        PROMPTS[1], "--seed", "9", "--output_dir", str(tmp_path / "out"),
                                        "--output_name", "x", "--num_inference_steps", "2", "--guidance_scale", "2.0",
                                        "--device", "cpu", "--generate_standard", "--save_noise",
                                        "--sampling_model_id", str(other_dir)]))
    assert settings["sampler"]["name"] == "sdxl" and settings["sampling_model_id"] == str(other_dir)
    expected = other(PROMPTS[1], generator=torch.Generator().manual_seed(9), num_inference_steps=2,
                     guidance_scale=2.0).images[0]
    assert np.array_equal(pixels(tmp_path / "out" / "x_standard.png"), np.asarray(expected))
    from golden_noise import GoldenNoise

    gn = GoldenNoise.from_pretrained(sampler_setup["root"] / "run", pipe=tiny_pipeline)
    torch.testing.assert_close(load_tensor(tmp_path / "out" / "x_golden_noise.pt"), gn(PROMPTS[1], seed=9)[0])
