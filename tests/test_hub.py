"""The Hub, model side (issue 18 part 3): GoldenNoise.from_pretrained by hub id from an offline cache laid out as
huggingface_hub lays it out, push_to_hub / scripts/push_model.py / the trainer's --push_to_hub against a recorder
standing in for HfApi (the exact files and card sent), the model card, and foreign or tampered repos as one-line
errors. The export is a real (3-step) training run on a dataset in stage 2's layout whose run_config is the tiny
pipeline's."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from golden_noise import hub
from golden_noise.dataset import format as layout
from golden_noise.errors import UserError
from golden_noise.export import (FINAL_STEM, HUB_CONFIG, HUB_WEIGHTS, config_sha256, file_sha256, load_export,
                                 sealed_weights, stage_for_hub)
from golden_noise.testing.hub import UploadRecorder, cache_repo
from tests.conftest import load_cli
from tests.test_inference import PROMPT, TRAIN_GOLDEN
from tests.test_training import write_synthetic_dataset

REPO = "golden-user/golden-noise-tiny"
TINY = dict(cnn_base_filters=8, cnn_num_blocks=[1, 1], cnn_feat_dim=32, gru_hidden_size=32, gru_num_layers=1,
            text_proj_dim=32, norm_groups=8)
TINY_FLAGS = ["--cnn_base_filters", 8, "--cnn_num_blocks", 1, 1, "--cnn_feat_dim", 32, "--gru_hidden_size", 32,
              "--gru_num_layers", 1, "--text_proj_dim", 32, "--norm_groups", 8]
TRAIN = "src/train_rnn_model_v3.py"


def reset_process_state() -> None:
    """What a fresh process has: no accelerate state, no logging handlers (in-process trainings)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    for handler in logging.getLogger().handlers[:]:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(autouse=True)
def fresh_process_state():
    reset_process_state()
    yield
    reset_process_state()


@pytest.fixture(scope="module")
def dataset(tiny_pipeline, tiny_pipeline_dir, tmp_path_factory) -> Path:
    """8 samples in stage 2's layout (random tensors, n = 3, latents 4x16x16) with the run_config stage 2 writes for
    the tiny pipeline (family, latent space, golden step, text embedding, base model)."""
    from golden_noise.golden import GoldenStep
    from golden_noise.dataset.generate import GenerationSettings, build_run_config

    root = write_synthetic_dataset(tmp_path_factory.mktemp("hubdata") / "ds", n=8, steps=3, shape=(4, 16, 16), dim=32)
    settings = GenerationSettings(base_model_id=str(tiny_pipeline_dir), num_steps=3, golden=TRAIN_GOLDEN,
                                  storage_dtype="float32")
    step = GoldenStep(tiny_pipeline.unet, tiny_pipeline.scheduler.config, TRAIN_GOLDEN)
    layout.write_run_config(root, {**build_run_config(tiny_pipeline, settings, step),
                                   "format_version": layout.LOOSE_FORMAT_VERSION})  # the loose files of format 1
    return root


def train_config(dataset: Path, out: Path, **kw):
    from golden_noise.training.config import TrainingConfig

    return TrainingConfig(dataset_dir=str(dataset), output_dir=str(out), max_train_steps=3, batch_size=4,
                          dataloader_num_workers=0, validation_fraction=0.25, report_to="none", seed=1, **kw)


@pytest.fixture(scope="module")
def export(dataset, tmp_path_factory) -> Path:
    """A training run directory: 3 steps with validation, its final export as the trainer writes it."""
    from golden_noise.training.config import architecture
    from golden_noise.training.trainer import Trainer

    out = tmp_path_factory.mktemp("hubrun") / "run"
    reset_process_state()
    Trainer(train_config(dataset, out), architecture(**TINY)).run()
    reset_process_state()
    return out


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub allowed to 'reach' the hub (every write goes to an UploadRecorder, nothing leaves)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return UploadRecorder.install(monkeypatch)


def export_files(run: Path) -> dict[str, bytes]:
    return {name: (run / f"{FINAL_STEM}{suffix}").read_bytes()
            for name, suffix in ((HUB_WEIGHTS, ".safetensors"), (HUB_CONFIG, ".json"))}


def repo_files(run: Path, tmp_path: Path, evaluation=None) -> dict[str, bytes]:
    """What a push of `run` uploads (the hub layout, card included)."""
    folder = stage_for_hub(load_export(run), tmp_path / "staged", REPO, evaluation)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def card_parts(card: str) -> tuple[dict, str]:
    """(YAML metadata, body) of a model card."""
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_cache_fixture_is_the_layout_huggingface_hub_reads(hub_cache):
    """The offline-cache stand-in (for model and dataset repos): huggingface_hub's own cache scan and
    snapshot_download find exactly what cache_repo put there, with HF_HUB_OFFLINE=1."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    files = {"README.md": b"# card\n", "data/train-00000-of-00001.parquet": b"PAR1 rows PAR1"}
    snaps = {t: cache_repo(hub_cache, f"owner/{t}-repo", files, repo_type=t) for t in hub.REPO_TYPES}
    info = scan_cache_dir(hub_cache)
    assert not info.warnings
    found = {(r.repo_id, r.repo_type): r for r in info.repos}
    for repo_type, snap in snaps.items():
        repo = found[(f"owner/{repo_type}-repo", repo_type)]
        [revision] = repo.revisions
        assert revision.commit_hash == snap.name and revision.refs == frozenset({"main"})
        assert sorted(f.file_name for f in revision.files) == ["README.md", "train-00000-of-00001.parquet"]
        assert snapshot_download(f"owner/{repo_type}-repo", repo_type=repo_type) == str(snap)
        folder = hub.snapshot(f"owner/{repo_type}-repo", repo_type)
        assert folder == snap and (folder / "data/train-00000-of-00001.parquet").read_bytes() == files[
            "data/train-00000-of-00001.parquet"]


def test_push_to_hub_then_load_by_id_offline(export, tiny_pipeline, hub_cache, online, monkeypatch, tmp_path):
    """GoldenNoise.push_to_hub sends exactly model.safetensors (the export's bytes), config.json (its config) and the
    card, in one commit that also clears pickles; the repo, put in the offline cache, loads by its id and gives the
    same golden latents with the same identity."""
    from huggingface_hub import constants

    from golden_noise import GoldenNoise

    local = GoldenNoise.from_pretrained(export, pipe=tiny_pipeline)
    url = local.push_to_hub(REPO, token="hf_test_token", private=True)
    [upload] = online.uploads
    assert url == f"https://huggingface.co/{REPO}/commit/1"
    assert online.created == [{"repo_id": REPO, "repo_type": "model", "private": True, "exist_ok": True,
                               "token": "hf_test_token"}]
    assert (upload.repo_id, upload.repo_type, upload.private, upload.token) == (REPO, "model", True, "hf_test_token")
    assert sorted(upload.files) == ["README.md", HUB_CONFIG, HUB_WEIGHTS]
    assert upload.files[HUB_WEIGHTS] == (export / f"{FINAL_STEM}.safetensors").read_bytes()  # byte for byte
    assert json.loads(upload.files[HUB_CONFIG]) == json.loads((export / f"{FINAL_STEM}.json").read_text())
    assert upload.commit_message == "Upload NoiseSequenceRNN_v3 (step 3)"
    assert {"*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt", "*.safetensors"} <= set(upload.delete_patterns)
    assert upload.files["README.md"].decode() == repo_files(export, tmp_path)["README.md"].decode()

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    snapshot = cache_repo(hub_cache, REPO, upload.files)
    gn = GoldenNoise.from_pretrained(REPO, pipe=tiny_pipeline)
    assert gn.export.files.repo_id == REPO and gn.export.files.revision == snapshot.name
    assert gn.export.files.weights == snapshot / HUB_WEIGHTS
    assert gn.identity == local.identity
    assert gn.identity == {"weights_sha256": file_sha256(export / f"{FINAL_STEM}.safetensors"),
                           "config_sha256": config_sha256(json.loads((export / f"{FINAL_STEM}.json").read_text()))}
    assert torch.equal(gn([PROMPT, "a red apple"], seed=[3, 4]), local([PROMPT, "a red apple"], seed=[3, 4]))
    assert gn.num_steps == 3 and gn.latent_shape == (4, 16, 16)


def test_model_card_states_what_it_was_trained_on(export, dataset, tmp_path):
    """The card's YAML (library, tags, what ties the model to a pipeline, the validation's explained fraction, the
    data fingerprint, the identity) and its body (training data, golden step, validation) come from the export."""
    from golden_noise.dataset.reader import dataset_fingerprint

    files = repo_files(export, tmp_path)
    meta, body = card_parts(files["README.md"].decode())
    doc = json.loads(files[HUB_CONFIG])
    validation = json.loads((export / "validation.json").read_text())
    rc = doc["run_config"]
    assert meta["library_name"] == "golden-noise-rnn" and "base_model" not in meta  # a local base model: no hub link
    assert meta["tags"] == ["golden-noise", "noise-optimization", "text-to-image", "diffusers", "sdxl",
                            "NoiseSequenceRNN_v3"]
    g = meta["golden_noise"]
    assert g["validation_explained_fraction"] == validation["validation"]["final_step"]["explained_fraction"]
    assert g["teacher_forcing_explained_fraction"] == validation["validation"]["teacher_forcing"]["explained_fraction"]
    assert g["data_fingerprint"] == doc["training"]["data_fingerprint"] == dataset_fingerprint(dataset)
    assert (g["family"], g["num_steps"], g["text_embedding"], g["latent_shape"]) == ("sdxl", 3, "pooled", [4, 16, 16])
    assert g["latent_space_fingerprint"] == rc["latent_space"]["fingerprint"]
    assert g["golden"] == {"denoise_guidance_scale": 4.0, "inversion_guidance_scale": 1.0, "schedule_steps": 10}
    assert (g["train_samples"], g["validation_samples"]) == (6, 2)
    assert g["weights_sha256"] == file_sha256(export / f"{FINAL_STEM}.safetensors")
    assert g["config_sha256"] == config_sha256(doc) and "evaluation" not in g
    assert f"# {REPO}" in body and f'GoldenNoise.from_pretrained("{REPO}", pipe=pipe)' in body
    assert f"`{rc['base_model_id']}`" in body and "w_l = 4.0, w_w = 1.0 on a 10-step DDIM schedule" in body
    assert "applied n = 3 times" in body and "6 for training, 2 held out" in body
    assert f"explains **{g['validation_explained_fraction']:.4f}** of the golden change" in body
    assert "## Evaluation" not in body

    # a hub base model is linked; a stage-6 summary (stage 6's own summarize) is tabulated and in the metadata
    from golden_noise.evaluation import summarize
    from golden_noise.model_card import model_card

    scores = {"HPSv2": {"standard": torch.linspace(0.2, 0.3, 6).numpy(),
                        "gnsnet": torch.linspace(0.21, 0.3, 6).numpy()}}
    results = summarize(scores, "standard", samples=200, seed=0)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "summary.json").write_text(json.dumps(
        {"baseline": "standard", "results": results, "n_prompts": 6, "n_evaluated": 6, "prompt_file": "p.txt"}))
    doc["run_config"]["base_model_id"] = "stabilityai/stable-diffusion-xl-base-1.0"
    meta, body = card_parts(model_card(doc, {"weights_sha256": "a" * 64, "config_sha256": "b" * 64}, REPO,
                                       tmp_path / "eval"))
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    gn = results["HPSv2"]["gnsnet"]
    assert meta["golden_noise"]["evaluation"]["results"]["HPSv2"]["gnsnet"] == {
        "n": 6, "mean": gn["mean"], "diff": gn["diff_mean"], "ci95": [gn["ci95_low"], gn["ci95_high"]],
        "win_rate": gn["win_rate"]}
    assert (f"| HPSv2 | gnsnet | 6 | {gn['mean']:.4f} | {gn['diff_mean']:+.4f} [{gn['ci95_low']:+.4f}, "
            f"{gn['ci95_high']:+.4f}] | {100 * gn['win_rate']:.1f}% |") in body
    with pytest.raises(UserError, match="no summary.json .* or sweep.csv"):
        model_card(doc, {"weights_sha256": "a", "config_sha256": "b"}, REPO, tmp_path)


def test_push_model_cli_writes_a_loadable_folder(export, tiny_pipeline, tmp_path, capsys):
    """scripts/push_model.py --local_dir writes the repo's files (nothing uploaded), and that folder loads like the
    hub repo; a bad --evaluation is one line before anything is written."""
    from golden_noise import GoldenNoise

    cli = load_cli("scripts/push_model.py")
    folder = tmp_path / "preview"
    cli.main(cli.parse_args([str(export), REPO, "--local_dir", str(folder)]))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", HUB_CONFIG, HUB_WEIGHTS]
    assert {n: (folder / n).read_bytes() for n in (HUB_WEIGHTS, HUB_CONFIG)} == {
        n: v for n, v in repo_files(export, tmp_path).items() if n != "README.md"}
    gn, local = GoldenNoise.from_pretrained(folder, pipe=tiny_pipeline), GoldenNoise.from_pretrained(export)
    assert gn.identity == local.identity and gn.export.files.weights == (folder / HUB_WEIGHTS).resolve()

    from golden_noise.runtime import run_cli

    capsys.readouterr()
    assert run_cli(cli.main, cli.parse_args, [str(export), REPO, "--local_dir", str(tmp_path / "p2"),
                                              "--evaluation", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: evaluation ") and "\n" not in err and not (tmp_path / "p2" / "README.md").exists()
    assert run_cli(cli.main, cli.parse_args, [str(export), "no-owner"]) == 2
    assert "names no owner" in capsys.readouterr().err


def test_trainer_push_to_hub_uploads_the_final_export(dataset, tmp_path, online):
    """--push_to_hub owner/name (with --hub_token, --hub_private_repo) uploads the final export; the flags are not
    recorded (the token never), so the export's bytes equal those of the same run without them."""
    cli = load_cli(TRAIN)
    out = tmp_path / "run"
    args = ["--dataset_dir", dataset, "--output_dir", out, "--max_train_steps", 3, "--batch_size", 4,
            "--dataloader_num_workers", 0, "--validation_fraction", 0.25, "--report_to", "none", "--seed", 1,
            *TINY_FLAGS]
    cli.main(cli.parse_args([str(a) for a in (*args, "--push_to_hub", REPO, "--hub_token", "hf_secret",
                                              "--hub_private_repo")]))
    [upload] = online.uploads
    assert (upload.repo_id, upload.private, upload.token) == (REPO, True, "hf_secret")
    pushed = export_files(out)
    assert {n: upload.files[n] for n in pushed} == pushed and "README.md" in upload.files
    assert b"hf_secret" not in pushed[HUB_CONFIG] and "push_to_hub" not in json.loads(pushed[HUB_CONFIG])[
        "training"]["args"]
    shutil.rmtree(out)
    reset_process_state()
    cli.main(cli.parse_args([str(a) for a in args]))
    assert export_files(out) == pushed and len(online.uploads) == 1


def test_trainer_refuses_a_push_that_cannot_happen_before_training(dataset, tmp_path, capsys, monkeypatch):
    """Offline, no token, or a repo id without an owner: one line before the first step (nothing written)."""
    from huggingface_hub import constants

    from golden_noise.runtime import run_cli

    cli = load_cli(TRAIN)
    base = ["--dataset_dir", str(dataset), "--output_dir", str(tmp_path / "run"), "--max_train_steps", "3",
            "--report_to", "none"]

    def error(*extra) -> str:
        capsys.readouterr()
        assert run_cli(cli.main, cli.parse_args, [*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not (tmp_path / "run").exists()
        return err[0]

    assert "HF_HUB_OFFLINE=1 forbids uploads" in error("--push_to_hub", REPO)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert "needs a Hugging Face token with write access" in error("--push_to_hub", REPO)
    assert "names no owner" in error("--push_to_hub", "just-a-name", "--hub_token", "x")
    assert "is not a Hugging Face repo id" in error("--push_to_hub", "a/b/c", "--hub_token", "x")


def _reseal(files: dict[str, bytes], doc: dict) -> dict[str, bytes]:
    """The repo with config.json replaced by `doc` and the weights sealed to it (a consistent, strict-key test)."""
    from safetensors.torch import load

    weights = sealed_weights(load(files[HUB_WEIGHTS]), "NoiseSequenceRNN_v3", doc)
    return {**files, HUB_CONFIG: json.dumps(doc, indent=2).encode(), HUB_WEIGHTS: weights}


def _tamper(case: str, files: dict[str, bytes], other: dict[str, bytes]) -> dict[str, bytes]:
    from golden_noise.diffusion.base import fingerprint

    doc = json.loads(files[HUB_CONFIG])
    if case == "pickle_file":
        return {**files, "pytorch_model.bin": b"\x80\x04K\x01."}
    if case == "edited_config":
        doc["model_config"]["delta_scale"] *= 10
        return {**files, HUB_CONFIG: json.dumps(doc).encode()}
    if case == "swapped_weights":
        return {**files, HUB_WEIGHTS: other[HUB_WEIGHTS]}
    if case == "missing_key":
        del doc["model_config"]["dropout"]
    elif case == "extra_key":
        doc["notes"] = "hello"
    elif case == "extra_model_key":
        doc["model_config"]["attention"] = True
    elif case == "unknown_model_type":
        doc["model_type"] = "SomeoneElsesNet"
    elif case == "no_pipeline_ties":
        del doc["run_config"]["latent_space"]
    elif case == "unknown_family":
        doc["run_config"]["family"]["name"] = "kandinsky"
    elif case == "other_latent_space":
        space = {k: v for k, v in doc["run_config"]["latent_space"].items() if k != "fingerprint"}
        space["scaling_factor"] = 0.13025
        doc["run_config"]["latent_space"] = {**space, "fingerprint": fingerprint(space)}
    elif case == "foreign_repo":  # a diffusers model repo
        return {"config.json": b'{"_class_name": "UNet2DConditionModel"}',
                "diffusion_pytorch_model.safetensors": files[HUB_WEIGHTS]}
    return _reseal(files, doc)


TAMPERED = {
    "pickle_file": r"holds pickle files \(pytorch_model.bin\), which this project never loads",
    "edited_config": "config.json does not belong to model.safetensors: edited after export",
    "swapped_weights": "config.json does not belong to model.safetensors: edited after export, or the two files "
                       "come from different exports",
    "missing_key": r"model_config of NoiseSequenceRNN_v3 lacks \['dropout'\]",
    "extra_key": r"unknown key\(s\) \['notes'\]",
    "extra_model_key": r"model_config of NoiseSequenceRNN_v3 has unknown key\(s\) \['attention'\]",
    "unknown_model_type": "unknown model_type 'SomeoneElsesNet': this version knows NoiseSequenceRNN_v3",
    "no_pipeline_ties": r"run_config lacks \['latent_space'\], which tie the model to a pipeline",
    "unknown_family": "run_config.family .* is no family this project knows",
    "other_latent_space": r"the pipeline \(StableDiffusionXLPipeline\) works in another latent space than the RNN",
    "foreign_repo": "holds no golden-noise export",
    "not_in_cache": "neither a local path nor in the Hugging Face cache, and the hub cannot be reached "
                    r"\(HF_HUB_OFFLINE=1\)",
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_foreign_or_tampered_repos_are_one_line_errors(case, export, dataset, tiny_pipeline, hub_cache, tmp_path):
    from golden_noise import GoldenNoise

    files, other = repo_files(export, tmp_path), None
    if case == "swapped_weights":  # another training's export of the same architecture
        model, meta = load_export(export).model, json.loads(files[HUB_CONFIG])
        torch.nn.init.normal_(model.mean_head.weight, std=0.1)
        model.save_pretrained(tmp_path / "other" / FINAL_STEM,
                              {"run_config": meta["run_config"], "training": {**meta["training"], "global_step": 9}})
        other = export_files(tmp_path / "other")
    if case != "not_in_cache":
        cache_repo(hub_cache, f"owner/{case}", _tamper(case, files, other))
    with pytest.raises(UserError, match=TAMPERED[case]) as e:
        GoldenNoise.from_pretrained(f"owner/{case}", pipe=tiny_pipeline)
    assert "\n" not in str(e.value)


def test_online_repo_listing_refuses_pickles_before_downloading(export, tmp_path, monkeypatch):
    """Online, a repo's file list is checked before anything is downloaded, and only the export's files (and the
    card) are downloaded."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = [".gitattributes", "README.md", HUB_CONFIG, HUB_WEIGHTS, "samples/grid.png"]
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda api, repo_id, **kw: listing)
    snapshot, calls = cache_repo(tmp_path / "cache", "owner/x", repo_files(export, tmp_path)), []

    def download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert load_export("owner/x", revision="v1").files.weights == snapshot / HUB_WEIGHTS
    [(repo_id, kwargs)] = calls
    assert repo_id == "owner/x" and kwargs["revision"] == "v1" and kwargs["repo_type"] == "model"
    assert sorted(kwargs["allow_patterns"]) == ["README.md", HUB_CONFIG, HUB_WEIGHTS]
    listing.append("optimizer.pt")
    with pytest.raises(UserError, match=r"hub model repo owner/x holds pickle files \(optimizer.pt\)"):
        load_export("owner/x")
    assert len(calls) == 1  # refused before any download


def test_local_paths_win_and_hub_ids_are_recognised(export, tmp_path, monkeypatch):
    """A relative path to an export is local even though it is spelled like 'owner/name'; real paths and files are
    never taken for hub ids."""
    monkeypatch.chdir(export.parent)
    assert hub.is_repo_id("owner/name") and not hub.is_repo_id("./owner/name") and not hub.is_repo_id("/a/b")
    assert not hub.is_repo_id("a/b/c") and not hub.is_repo_id("owner/x.safetensors", (".safetensors",))
    here = load_export(f"{export.name}/{FINAL_STEM}")  # 'run/rnn_v3_model_final': a repo id's spelling, but local
    assert here.files.repo_id is None and here.files.weights == (export / f"{FINAL_STEM}.safetensors").resolve()
    assert load_export(export.name).files == here.files
