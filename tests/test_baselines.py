"""The learned-noise baselines beside the RNN: the one-step direct model and NPNet (golden_noise.model), trained by
the same trainer (--model_type, --train_fraction), exported and loaded through the model-type registry, rolled out
by the API and stage 5, costed and compared at matched compute by the sweep; and NPNet's forward against a fixture
made once with NPNet's own public code (tests/fixtures/npnet/make_npnet_fixture.py says how)."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from golden_noise.dataset.reader import collate, open_dataset
from golden_noise.diffusion import encode_prompts, sample_images, seeded_noise, text_embedding
from golden_noise.errors import UserError
from golden_noise.export import load_export
from golden_noise.inference import GoldenNoise
from golden_noise.model import model_type_of
from golden_noise.model.direct import DirectNoiseModel
from golden_noise.model.npnet import CHECKPOINT_PARTS, NPNet, NPNetConfig, config_from_released, load_released
from golden_noise.model.rnn_seq_model_v3 import FINAL_STEM, NoiseSequenceRNN_v3, NoiseSequenceRNNConfig
from golden_noise.stats import paired_comparison
from golden_noise.sweep.cost import count_flops, rollout_flops, svd_flops
from golden_noise.testing.weights import key_filled, reference_input
from golden_noise.training.config import architecture
from golden_noise.training.core import keep_fraction
from tests.conftest import ROOT, load_cli
from tests.test_generate import run_main
from tests.test_inference import TRAIN_STEPS, make_export
from tests.test_training import fresh_process_state, npd_dataset, train, write_synthetic_dataset  # noqa: F401

FIXTURE = ROOT / "tests" / "fixtures" / "npnet" / "npnet_reference.safetensors"
# a toy NPNet (Swin at 16 px, patch 2, two stages) for 16 x 16 latents: seconds to train on CPU
TINY_NPNET = dict(svd_hidden_dim=8, svd_mlp_dim=16, svd_num_heads=2, swin_img_size=16, swin_patch_size=2,
                  swin_embed_dim=8, swin_depths=[1, 1], swin_num_heads=[1, 2], swin_window_size=4, swin_num_classes=0)
NPNET_FLAGS = [f for k, v in TINY_NPNET.items() for f in (f"--{k}", *(v if isinstance(v, list) else [v]))]
PROMPTS = ["a red apple on a table", "a blue car", "a cat wearing a hat", "synthwave city at sunset"]


class CodeObject:
    """Any class instance: a pickle holding one needs code to load, which weights_only=True refuses."""


def their_key(key: str) -> str:
    """Our state-dict key -> the key in NPNet's checkpoint ("text_embedding.x" is "embeeding.x" there)."""
    inverse = {ours: theirs for theirs, ours in CHECKPOINT_PARTS.items()}
    head, _, rest = key.partition(".")
    return f"{inverse[head]}.{rest}" if head in inverse else key


def filled_npnet(config: NPNetConfig) -> NPNet:
    """NPNet with every tensor filled by the fixture's rule, keyed by the checkpoint's names."""
    model = NPNet(config).eval()
    state = model.state_dict()
    model.load_state_dict({k: key_filled(their_key(k), v.shape, v.dtype) for k, v in state.items()}, strict=True)
    return model


def fixture() -> tuple[dict, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FIXTURE), "pt") as f:
        meta = f.metadata()
    return load_file(str(FIXTURE)), meta


# ---- NPNet against NPNet's public code ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["small", "sdxl"])
def test_npnet_forward_equals_the_public_code(case):
    """Same weights (the fixture's rule), same input: our NPNet's output equals what NPNet's own code computed
    (their NPNet class loading a checkpoint in the released format at SDXL size; their components at a toy size),
    and our state dict has exactly the released checkpoint's keys and shapes."""
    tensors, meta = fixture()
    if case == "sdxl":
        config = NPNetConfig()  # the released SDXL model's sizes
        inputs = (reference_input("sdxl.latent", (1, 4, 128, 128)),
                  reference_input("sdxl.prompt_embeds", (1, 77, 2048)))
    else:
        config = NPNetConfig(noise_resolution=8, text_embed_dim=77 * 16)
        inputs = (tensors["small.latent"], tensors["small.prompt_embeds"])
    model = filled_npnet(config)
    layout = json.loads(meta[f"{case}_checkpoint_layout"])
    ours = {their_key(k): list(v.shape) for k, v in model.state_dict().items()}
    if case == "small":  # the small case recorded the three sub-modules only
        ours = {k: v for k, v in ours.items() if k not in ("alpha", "beta")}
    assert ours == layout
    with torch.no_grad():
        out, logvar = model(*inputs)
    expected = tensors[f"{case}.output"]
    assert logvar is None and out.shape == expected.shape
    # float32 at SDXL size: CPUs' kernels (AVX2, AVX-512, thread counts) differ in their last bits, up to 4.3e-4 on
    # an output of std 2.2 on the machines seen; 2e-3 is 0.1% of that std, 10x below the change one weight makes
    tol = 2e-3 if case == "sdxl" else 1e-5
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=tol)
    # the test can fail: one weight changed by a little changes the output
    with torch.no_grad():
        model.alpha.add_(0.01)
        assert not torch.allclose(model(*inputs)[0], expected, rtol=1e-5, atol=tol)


def released_checkpoint(model: NPNet) -> dict:
    """`model`'s weights in NPNet's released format: {"unet_svd", "unet_embedding", "embeeding", "alpha", "beta"}."""
    state = model.state_dict()
    out = {theirs: {k[len(ours) + 1:]: v for k, v in state.items() if k.startswith(ours + ".")}
           for theirs, ours in CHECKPOINT_PARTS.items()}
    out.update(alpha=state["alpha"].clone(), beta=state["beta"].clone())
    return out


def test_released_checkpoint_loads_with_weights_only(tmp_path):
    """A checkpoint in NPNet's released format (torch.save of a dict of state dicts) loads without unpickling code,
    its sizes read from its tensors; the same forward; other files are one clear error."""
    config = NPNetConfig(noise_resolution=8, text_embed_dim=96, **{**TINY_NPNET, "svd_num_heads": 8})  # NPNet's 8
    model = filled_npnet(config)
    path = tmp_path / "sdxl.pth"
    torch.save(released_checkpoint(model), path)
    assert config_from_released(torch.load(path, weights_only=True)).to_dict() == {**config.to_dict(),
                                                                                  "swin_drop_path_rate": 0.1}
    export = load_released(path)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 96)
    torch.testing.assert_close(export.model(x, text)[0], model(x, text)[0], rtol=0, atol=0)
    assert export.meta["model_type"] == "NPNet" and export.meta["run_config"]["num_steps"] == 1
    assert export.meta["run_config"]["text_embedding"] == {"kind": "prompt_embeds", "dim": 96}
    assert export.identity["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    gn = GoldenNoise.from_pretrained(path, model_type="NPNet", flag="--npnet_weights")
    assert (gn.model_type, gn.predicts_step) == ("NPNet", 1)

    torch.save({"unet_svd": {}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not NPNet's released checkpoint: it lacks unet_embedding"):
        load_released(tmp_path / "other.pth")

    torch.save({"x": CodeObject()}, tmp_path / "code.pth")  # unpickling it would import and build a class
    with pytest.raises(UserError, match="weights_only=True"):
        load_released(tmp_path / "code.pth")


# ---- training, export and load -----------------------------------------------------------------------------------

def test_train_fraction_is_a_nested_deterministic_subset(npd_dataset):
    train_set = open_dataset(npd_dataset, 0.25).train
    small, large = keep_fraction(train_set, 0.1), keep_fraction(train_set, 0.5)
    assert (len(small), len(large)) == (5, 24) and set(small.ids) <= set(large.ids) <= set(train_set.ids)
    assert keep_fraction(train_set, 0.1).ids == small.ids and keep_fraction(train_set, 1.0).ids == train_set.ids
    with pytest.raises(UserError, match="--train_fraction must be in"):
        keep_fraction(train_set, 0.0)


def test_train_fraction_is_the_same_subset_in_either_format(tmp_path, capsys):
    """Loose files (format 1) and their conversion to shards (format 2) give the same nested subsets, which read the
    same tensors: a subset is a choice of ids, not of files."""
    loose = write_synthetic_dataset(tmp_path / "loose", n=40, dtype=torch.float16)
    assert run_main(capsys, "scripts/convert_dataset.py", loose, tmp_path / "sharded", "--samples_per_shard", 8)[0] == 0
    a, b = (open_dataset(root, 0.25).train for root in (loose, tmp_path / "sharded"))
    assert type(a) is not type(b) and a.ids == b.ids
    for fraction in (0.1, 0.3, 1.0):
        x, y = keep_fraction(a, fraction), keep_fraction(b, fraction)
        assert x.ids == y.ids and len(x) == max(1, round(fraction * len(a)))
        for i in range(len(x)):
            assert all(torch.equal(x[i][k], y[i][k]) for k in ("source", "golden", "text"))
    assert set(keep_fraction(b, 0.1).ids) <= set(keep_fraction(b, 0.3).ids)


@pytest.mark.parametrize("model_type", ["DirectNoiseModel", "NPNet"])
def test_one_step_models_train_export_and_load(model_type, npd_dataset, tmp_path, capsys):
    """The same trainer, another --model_type: the one-step model learns x'_n from x_T on held-out sequences (an
    untrained direct model is the identity and explains 0), exports with its model_type and the step it predicts,
    and loads back through the registry into the same predictions; gnsnet's flag refuses it."""
    out = tmp_path / model_type
    extra = NPNET_FLAGS if model_type == "NPNet" else []
    summary = train("--dataset_dir", npd_dataset, "--output_dir", out, "--model_type", model_type, "--max_train_steps",
                    150, "--batch_size", 8, "--learning_rate", 2e-3, "--dropout", 0, "--validation_fraction", 0.25,
                    "--validation_steps", 0, "--save_steps", 1000, "--logging_steps", 50, "--train_fraction", 0.75,
                    "--report_to", "none", *extra)
    stdout = capsys.readouterr().out
    report = summary["validation"]
    assert summary["model_type"] == model_type and summary["train_samples"] == 36  # 75% of the 48 training ids
    assert report["num_steps"] == 4 and report["final_step"]["step"] == 4 and len(report["rollout"]["per_step"]) == 1
    assert report["final_step"]["explained_fraction"] > 0.05, stdout
    assert "one-step prediction of x'_4 explains" in stdout

    meta = json.loads((out / f"{FINAL_STEM}.json").read_text())
    assert meta["model_type"] == model_type and meta["run_config"]["num_steps"] == 4
    assert meta["training"]["args"]["model_type"] == model_type and meta["training"]["args"]["train_fraction"] == 0.75
    model = load_export(out).model
    assert type(model) is (DirectNoiseModel if model_type == "DirectNoiseModel" else NPNet)
    assert model_type_of(meta) == model_type
    data = open_dataset(npd_dataset, 0.25)
    batch = collate([data.validation[i] for i in range(len(data.validation))])
    pred = model.generate_sequence(batch["source"], batch["text"], 4)  # (V, 1, C, H, W)
    assert pred.shape == (16, 1, 4, 16, 16)
    err = (pred[:, 0] - batch["golden"][:, -1]).pow(2).mean().item()
    assert err == pytest.approx(report["final_step"]["model_mse"], rel=1e-4)

    gn = GoldenNoise.from_pretrained(out, model_type=model_type)
    assert (gn.model_type, gn.predicts_step, gn.num_steps) == (model_type, 4, 4)
    torch.testing.assert_close(gn.rollout(batch["source"], batch["text"])[:, -1], pred[:, 0])
    with pytest.raises(UserError, match="predicts x'_4 in one forward .*pass --num_gen_steps 4"):
        gn.rollout(batch["source"], batch["text"], 2)
    with pytest.raises(UserError, match=f"--rnn_weights_path {out} is a {model_type} export, not NoiseSequenceRNN_v3"):
        GoldenNoise.from_pretrained(out, model_type="NoiseSequenceRNN_v3")


def test_direct_is_the_rnn_network_for_one_step():
    """Equal parameter budget by construction: the direct model is the RNN's network (same state-dict keys and
    sizes); its one forward is the RNN's first step from x_T."""
    config = NoiseSequenceRNNConfig(noise_resolution=8, text_embed_dim=16, cnn_base_filters=8, cnn_num_blocks=[1, 1],
                                    cnn_feat_dim=16, gru_hidden_size=16, gru_num_layers=1, text_proj_dim=8,
                                    norm_groups=4, dropout=0.0)
    torch.manual_seed(0)
    rnn = NoiseSequenceRNN_v3(config).eval()
    torch.nn.init.normal_(rnn.mean_head.weight, std=0.2)
    direct = DirectNoiseModel(config).eval()
    direct.load_state_dict(rnn.state_dict(), strict=True)
    x, text = torch.randn(3, 4, 8, 8), torch.randn(3, 16)
    torch.testing.assert_close(direct.generate_sequence(x, text)[:, 0], rnn.generate_sequence(x, text, 1)[:, 0])


def test_model_type_flags(tmp_path, capsys):
    cli = load_cli("src/train_rnn_model_v3.py")
    args = cli.parse_args(["--model_type", "NPNet", "--swin_depths", "1", "1", "--swin_num_heads", "1", "2"])
    assert isinstance(args.arch, NPNetConfig) and args.arch.swin_depths == [1, 1]
    assert isinstance(cli.parse_args(["--model_type", "DirectNoiseModel"]).arch, NoiseSequenceRNNConfig)
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            cli.parse_args(["--train_fraction", bad])
        assert "--train_fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--model_type", "NPNet", "--swin_depths", "1", "1", "--swin_num_heads", "1"])
    assert "need one entry per stage" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not architecture fields of NoiseSequenceRNN_v3"):
        architecture("NoiseSequenceRNN_v3", swin_depths=[1])


# ---- stage 5, costs and the sweep --------------------------------------------------------------------------------

def make_one_step_export(stem: Path, model_type: str, pipe, pipe_dir: Path, seed: int = 1) -> Path:
    """A random direct or npnet export for the tiny pipeline, with the run_config of make_export's data (n = 3)."""
    rnn = make_export(stem.parent / "rnn_tmp" / FINAL_STEM, pipe, pipe_dir, seed=seed)
    meta = json.loads(rnn.with_suffix(".json").read_text())
    torch.manual_seed(seed)
    if model_type == "DirectNoiseModel":
        model = DirectNoiseModel(NoiseSequenceRNNConfig.from_dict(meta["model_config"]))
        torch.nn.init.normal_(model.mean_head.weight, std=0.2)
    else:
        dim = meta["model_config"]["text_embed_dim"]
        model = NPNet(NPNetConfig(noise_resolution=16, text_embed_dim=dim, **{**TINY_NPNET, "svd_num_heads": 4}))
        with torch.no_grad():
            model.beta.fill_(0.5)
    model.save_pretrained(stem, extra={"run_config": meta["run_config"]})
    return stem


@pytest.fixture(scope="module")
def exports(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("baselines")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return {"root": root, "prompts": root / "prompts.txt",
            "rnn": make_export(root / "rnn" / FINAL_STEM, tiny_pipeline, tiny_pipeline_dir).parent,
            "direct": make_one_step_export(root / "direct" / FINAL_STEM, "DirectNoiseModel", tiny_pipeline,
                                           tiny_pipeline_dir).parent,
            "npnet": make_one_step_export(root / "npnet" / FINAL_STEM, "NPNet", tiny_pipeline,
                                          tiny_pipeline_dir).parent}


def test_batch_inference_direct_and_npnet(exports, tiny_pipeline, tiny_pipeline_dir, tmp_path, capsys):
    """Stage 5's direct and npnet images are the pipeline's images from the model's prediction for each seed's x_T;
    the settings name each export; missing flags, a wrong export type and another n are one-line errors."""
    out = tmp_path / "images"
    base = ["scripts/batch_inference.py", "--prompt_file", exports["prompts"], "--output_base_dir", out,
            "--base_model_id", tiny_pipeline_dir, "--num_inference_steps", 2, "--guidance_scale", 1, "--batch_size", 2,
            "--start_seed", 10, "--device", "cpu"]
    code, _, err = run_main(capsys, *map(str, base), "--methods", "standard", "direct", "npnet", "--direct_weights",
                            str(exports["direct"]), "--npnet_weights", str(exports["npnet"]))
    assert code == 0, err
    settings = json.loads((out / "batch_settings.json").read_text())
    assert settings["num_gen_steps_used"] == TRAIN_STEPS and settings["rnn_sha256"] is None
    assert settings["direct_sha256"] and settings["npnet_sha256"]
    assert settings["npnet_model_config"]["swin_img_size"] == 16
    cond = encode_prompts(tiny_pipeline, PROMPTS, with_uncond=False)
    text = text_embedding(tiny_pipeline, PROMPTS, cond, "pooled")
    x_T = seeded_noise([10 + i for i in range(len(PROMPTS))], (4, 16, 16))
    for method in ("direct", "npnet"):
        model = load_export(exports[method]).model
        latents = model.generate_sequence(x_T, text)[:, 0]
        assert not torch.allclose(latents, x_T, atol=1e-3)
        for i in range(len(PROMPTS)):  # a batch of two, as stage 5 ran it
            j = i - i % 2
            expected = sample_images(tiny_pipeline, PROMPTS[j:j + 2], latents[j:j + 2], 2, 1.0)[i - j]
            got = np.asarray(Image.open(out / f"{method}_output" / f"{i}.png").convert("RGB"))
            assert np.abs(got.astype(int) - np.asarray(expected.convert("RGB")).astype(int)).max() <= 1

    for args, message in (
            (["--methods", "direct"], "--methods direct needs --direct_weights"),
            (["--methods", "direct", "--direct_weights", str(exports["npnet"])],
             "is a NPNet export, not DirectNoiseModel"),
            (["--methods", "gnsnet", "--rnn_weights_path", str(exports["direct"])],
             "is a DirectNoiseModel export, not NoiseSequenceRNN_v3"),
            (["--methods", "direct", "--direct_weights", str(exports["direct"]), "--num_gen_steps", "2"],
             "its model predicts x'_3 in one forward, but this run's n is 2")):
        code, _, err = run_main(capsys, *map(str, base[:4]), str(tmp_path / "other"), *map(str, base[5:]), *args)
        assert code == 2 and message in err.strip().splitlines()[-1], err


def test_costs_of_the_learned_noises(exports):
    """FLOPs per rollout, counted on the meta device: the direct model is the RNN's first step; NPNet's count
    includes its SVD (counted by formula, since FlopCounterMode does not count it)."""
    direct, rnn = (GoldenNoise.from_pretrained(exports[m]) for m in ("direct", "rnn"))
    assert rollout_flops(direct, 3) == rollout_flops(rnn, 1) < rollout_flops(rnn, 3)
    npnet = GoldenNoise.from_pretrained(exports["npnet"])
    assert count_flops(torch.linalg.svd, torch.randn(2, 32, 32)) == svd_flops((2, 32, 32)) == 2 * 21 * 32 ** 3
    assert rollout_flops(npnet, 3) > svd_flops((1, 32, 32)) > 0


def test_sweep_compares_every_noise_at_matched_compute(exports, tiny_pipeline_dir, tmp_path, capsys):
    """scripts/sweep.py --methods standard gnsnet direct npnet oracle best_of_2 end to end: direct and npnet cells at
    the n they predict, their FLOPs in the cost, the oracle share, and every non-standard cell compared with the
    cheapest standard cells costing at least as much (the best of them), standard-only step counts included."""
    out = tmp_path / "sweep"
    rewards = tmp_path / "rewards.py"
    rewards.write_text("import numpy as np\n\nclass Brightness:\n    def score(self, images, prompts):\n"
                       "        return [float(np.asarray(im.convert('L'), dtype=np.float64).mean() / 255) "
                       "for im in images]\n", encoding="utf-8")
    args = ["scripts/sweep.py", "--prompt_file", exports["prompts"], "--output_dir", out, "--base_model_id",
            tiny_pipeline_dir, "--rnn_weights_path", exports["rnn"], "--direct_weights", exports["direct"],
            "--npnet_weights", exports["npnet"], "--guidance_scales", 1, 3, "--num_inference_steps", 2,
            "--standard_steps", 3, "--num_gen_steps", 1, 3, "--methods", "standard", "gnsnet", "direct", "npnet",
            "oracle", "best_of_2", "--metrics", f"{rewards}:Brightness", "--start_seed", 5, "--batch_size", 2,
            "--device", "cpu", "--no_progress", "--bootstrap_samples", 300]
    code, stdout, err = run_main(capsys, *map(str, args))
    assert code == 0, err
    with open(out / "sweep.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    cells = {(r["method"], float(r["guidance_scale"]), int(r["num_inference_steps"]), r["num_gen_steps"]) for r in rows}
    for w in (1.0, 3.0):
        assert {("direct", w, 2, "3"), ("npnet", w, 2, "3"), ("gnsnet", w, 2, "1"), ("oracle", w, 2, "3"),
                ("standard", w, 3, "")} <= cells
        assert ("direct", w, 2, "1") not in cells and ("gnsnet", w, 3, "1") not in cells  # 3 steps: standard only
    for r in rows:
        if r["method"] in ("direct", "npnet"):
            oracle = next(o for o in rows if (o["method"], o["guidance_scale"], o["num_gen_steps"])
                          == ("oracle", r["guidance_scale"], "3"))
            no_gain = float(oracle["ci_low"]) <= 0 <= float(oracle["ci_high"])
            assert float(r["rollout_unet_fraction"]) > 0 and (r["share_of_oracle_gain"] == "") == no_gain
            cell_dir = out / "cells" / f"w{float(r['guidance_scale'])!r}_s2_n3"
            assert (cell_dir / f"{r['method']}_output" / "0.png").is_file()
    standard = {(float(r["guidance_scale"]), int(r["num_inference_steps"])): r
                for r in rows if r["method"] == "standard"}
    for r in rows:
        if r["method"] == "standard":
            assert r["diff_vs_matched"] == ""
            continue
        cost = float(r["unet_evals_per_image"])
        above = {k: float(s["unet_evals_per_image"]) for k, s in standard.items()
                 if float(s["unet_evals_per_image"]) >= cost - 1e-9}
        if not above:
            assert r["diff_vs_matched"] == "" and r["matched_rule"] == ""
            continue
        cheapest = min(above.values())
        best = max((k for k, v in above.items() if v == cheapest), key=lambda k: float(standard[k]["mean"]))
        assert (float(r["matched_guidance_scale"]), int(r["matched_num_inference_steps"])) == best
        assert float(r["matched_unet_evals_per_image"]) == cheapest >= cost
        ours = json.loads((out / "cells" / f"w{float(r['guidance_scale'])!r}_s2_n{r['num_gen_steps']}" / "scores"
                           / r["method"] / "Brightness.json").read_text())["scores"] if r["num_gen_steps"] else None
        if ours is not None:  # recompute the paired comparison from the stored scores
            theirs = json.loads((out / "cells" / f"w{best[0]!r}_s{best[1]}" / "scores" / "standard"
                                 / "Brightness.json").read_text())["scores"]
            p = paired_comparison(np.array(ours), np.array(theirs), samples=300, seed=0)
            assert float(r["diff_vs_matched"]) == pytest.approx(p["diff_mean"])
            assert float(r["ci_low_vs_matched"]) == pytest.approx(p["ci95_low"])
    gn1 = next(r for r in rows if (r["method"], r["guidance_scale"], r["num_gen_steps"]) == ("gnsnet", "1.0", "1"))
    assert gn1["matched_rule"] == "more steps (3 vs 2), CFG off as well"  # 2 steps + a fraction -> 3 steps, w = 1
    assert "vs matched compute" in stdout and "direct" in stdout
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "vs standard at matched compute" in report and "beats standard noise at matched compute" in report
