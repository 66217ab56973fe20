"""NoiseSequenceRNN_v3: shapes, identity start, rollout, save -> load round trip, byte-reproducible exports, bad
exports, the config's field help, cost at SDXL size."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch

from golden_noise.errors import UserError
from golden_noise.model.rnn_seq_model_v3 import FINAL_STEM, NoiseSequenceRNN_v3, NoiseSequenceRNNConfig


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run ~10x faster on one thread than on two oversubscribed ones (shared test CPUs)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw) -> NoiseSequenceRNNConfig:
    base = dict(latent_channels=4, noise_resolution=16, text_embed_dim=32, text_proj_dim=16, cnn_base_filters=8,
                cnn_num_blocks=[1, 1], cnn_feat_dim=32, gru_hidden_size=32, gru_num_layers=2, norm_groups=4,
                dropout=0.1, delta_scale=0.05)
    return NoiseSequenceRNNConfig(**{**base, **kw})


def perturbed(model: NoiseSequenceRNN_v3, seed: int = 0) -> NoiseSequenceRNN_v3:
    """Give the zero-initialised heads and FiLM layers random weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mean_head" in name or "logvar_head.weight" in name or "film" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_forward_shapes_and_identity_start():
    torch.manual_seed(0)
    model = NoiseSequenceRNN_v3(tiny_config(predict_variance=True))
    x_prev, text = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 32)  # (B, T, C, H, W), (B, P)
    mean, logvar = model(x_prev, text)
    assert mean.shape == logvar.shape == (2, 3, 4, 16, 16)
    # the change head starts at zero: an untrained model *is* the identity baseline x'_k = x'_{k-1}
    assert torch.equal(mean, x_prev)
    assert torch.allclose(logvar, torch.full_like(logvar, 2 * torch.log(torch.tensor(0.05)).item()))
    mean.sum().backward()  # every parameter takes part in the graph
    assert model.mean_head.weight.grad is not None and model.encoder.stem.weight.grad is not None

    no_var = NoiseSequenceRNN_v3(tiny_config(predict_variance=False))
    assert no_var(x_prev, text)[1] is None


def test_rollout_matches_teacher_forcing_on_its_own_outputs():
    torch.manual_seed(0)
    model = perturbed(NoiseSequenceRNN_v3(tiny_config(predict_variance=True))).train()
    x_T, text = torch.randn(3, 4, 16, 16), torch.randn(3, 32)
    seq = model.generate_sequence(x_T, text, 4)  # (B, n, C, H, W)
    assert seq.shape == (3, 4, 4, 16, 16)
    assert model.training, "generate_sequence must restore train mode"
    assert torch.equal(seq, model.generate_sequence(x_T, text, 4)), "mean rollout is deterministic"
    assert not torch.allclose(seq[:, 0], x_T), "a perturbed model changes the noise"
    # one teacher-forced pass over [x_T, x^'_1 .. x^'_{n-1}] reproduces the step-by-step rollout (GRU state carried)
    model.eval()
    with torch.no_grad():
        mean, _ = model(torch.cat([x_T[:, None], seq[:, :-1]], dim=1), text)
    torch.testing.assert_close(mean, seq, atol=2e-5, rtol=1e-5)
    # sampled rollouts follow the generator
    s1 = model.generate_sequence(x_T, text, 2, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = model.generate_sequence(x_T, text, 2, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2) and not torch.allclose(s1, seq[:, :2])


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = perturbed(NoiseSequenceRNN_v3(tiny_config(predict_variance=True, cnn_num_blocks=[1, 2, 1]))).eval()
    extra = {"run_config": {"latent_shape": [4, 16, 16], "num_steps": 3}, "training": {"global_step": 7}}
    weights, meta_path = model.save_pretrained(tmp_path / FINAL_STEM, extra)
    assert weights.name == f"{FINAL_STEM}.safetensors" and meta_path.name == f"{FINAL_STEM}.json"
    meta = json.loads(meta_path.read_text())
    assert meta["model_config"]["cnn_num_blocks"] == [1, 2, 1] and meta["training"]["global_step"] == 7
    x_T, text = torch.randn(2, 4, 16, 16), torch.randn(2, 32)
    expected = model.generate_sequence(x_T, text, 3)
    for path in (weights, meta_path, tmp_path / FINAL_STEM, tmp_path):
        loaded, meta = NoiseSequenceRNN_v3.from_pretrained(path)
        assert not loaded.training and meta["run_config"]["num_steps"] == 3
        assert loaded.config == model.config
        assert torch.equal(loaded.generate_sequence(x_T, text, 3), expected)
    half, _ = NoiseSequenceRNN_v3.from_pretrained(tmp_path, dtype=torch.float64)
    assert next(half.parameters()).dtype == torch.float64
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{FINAL_STEM}.json", f"{FINAL_STEM}.safetensors"]


def test_export_bytes_depend_only_on_weights_and_config(tmp_path):
    """safetensors orders its metadata by a per-call hash seed; the export sorts it, so equal models give equal
    files (and the file still loads with safetensors' own reader)."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = perturbed(NoiseSequenceRNN_v3(tiny_config(predict_variance=True)))
    files = [model.save_pretrained(tmp_path / f"m{i}", {"training": {"global_step": 3}}) for i in range(4)]
    assert len({w.read_bytes() for w, _ in files}) == 1 and len({m.read_bytes() for _, m in files}) == 1
    raw = files[0][0].read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    with safe_open(str(files[0][0]), framework="pt") as f:
        meta = f.metadata()
        assert meta == header["__metadata__"] and meta["model"] == "NoiseSequenceRNN_v3"
        assert json.loads(meta["model_config"]) == model.config.to_dict()
        # the seal: the sha256 of the config document's canonical JSON
        doc = json.loads(files[0][1].read_text())
        canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        assert meta["config_sha256"] == hashlib.sha256(canonical).hexdigest()
        for name, value in model.state_dict().items():
            assert torch.equal(f.get_tensor(name), value)
    assert files[0][0].stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_config_fields_carry_their_help():
    """The training CLI's architecture flags are generated from these fields: each has a help text."""
    for f in dataclasses.fields(NoiseSequenceRNNConfig):
        assert f.metadata.get("help"), f.name


def test_bad_exports_are_user_errors(tmp_path):
    from golden_noise.export import config_document, sealed_weights

    with pytest.raises(UserError, match="does not exist"):
        NoiseSequenceRNN_v3.from_pretrained(tmp_path / "nothing")
    model = NoiseSequenceRNN_v3(tiny_config())
    weights, meta = model.save_pretrained(tmp_path / "m")
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="m.safetensors"):
        NoiseSequenceRNN_v3.from_pretrained(weights)
    # weights of another architecture under a config sealed to them: the strict state-dict load refuses them
    other = NoiseSequenceRNN_v3(tiny_config(gru_hidden_size=48))
    doc = config_document(model)
    weights.write_bytes(sealed_weights({k: v.contiguous() for k, v in other.state_dict().items()},
                                       model.model_type, doc))
    with pytest.raises(UserError, match="cannot load model weights .*size mismatch"):
        NoiseSequenceRNN_v3.from_pretrained(meta)
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads(meta.read_text())
    cfg["model_config"]["no_such_field"] = 1
    meta.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="invalid model config .*unknown key.*no_such_field"):
        NoiseSequenceRNN_v3.from_pretrained(meta)
    del cfg["model_config"]["no_such_field"], cfg["model_config"]["dropout"]
    meta.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"invalid model config .*lacks \['dropout'\]"):
        NoiseSequenceRNN_v3.from_pretrained(meta)


@pytest.mark.parametrize("edit", ["delta_scale", "num_steps", "training", "reformatted"])
def test_an_edited_export_config_fails_to_load(tmp_path, edit):
    """Issue 20 item 4: the config is sealed by its sha256 in the weights' metadata, so an edited delta_scale or
    run_config.num_steps (which would silently change every rollout) is one line naming the file; re-indenting or
    reordering the JSON is not an edit."""
    model = perturbed(NoiseSequenceRNN_v3(tiny_config()))
    weights, meta = model.save_pretrained(tmp_path / FINAL_STEM, {"run_config": {"num_steps": 3},
                                                                   "training": {"global_step": 5}})
    cfg = json.loads(meta.read_text())
    if edit == "delta_scale":
        cfg["model_config"]["delta_scale"] = 0.5
    elif edit == "num_steps":
        cfg["run_config"]["num_steps"] = 10
    elif edit == "training":
        cfg["training"]["global_step"] = 50_000
    meta.write_text(json.dumps(dict(reversed(cfg.items())), indent=4 if edit == "reformatted" else None))
    if edit == "reformatted":
        assert NoiseSequenceRNN_v3.from_pretrained(tmp_path)[1] == cfg
        return
    with pytest.raises(UserError, match=f"{FINAL_STEM}.json does not belong to {FINAL_STEM}.safetensors: edited "
                                        "after export") as e:
        NoiseSequenceRNN_v3.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_exports_made_before_the_seal_still_load(tmp_path, caplog):
    """An export written by the previous format (no config_sha256 in the weights) loads, with a warning; an edit of
    its model_config is still caught by the copy its weights' metadata always held."""
    from golden_noise.export import safetensors_bytes

    model = perturbed(NoiseSequenceRNN_v3(tiny_config()))
    weights, meta = model.save_pretrained(tmp_path / FINAL_STEM, {"run_config": {"num_steps": 3}})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    weights.write_bytes(safetensors_bytes(state, {"format": "pt", "model": "NoiseSequenceRNN_v3",
                                                  "model_config": json.dumps(model.config.to_dict())}))
    loaded, _ = NoiseSequenceRNN_v3.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert "exported before configs were sealed" in caplog.text
    cfg = json.loads(meta.read_text())
    cfg["model_config"]["delta_scale"] = 0.5
    meta.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="edited after export.*its model_config differs"):
        NoiseSequenceRNN_v3.from_pretrained(tmp_path)


def test_config_checks_and_dict_round_trip():
    cfg = tiny_config(cnn_num_blocks=(2, 1, 1))
    assert NoiseSequenceRNNConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.stage_channels() == [8, 16, 32]
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(noise_resolution=18, cnn_num_blocks=[1, 1, 1])
    with pytest.raises(ValueError, match="cnn_num_blocks"):
        tiny_config(cnn_num_blocks=[])


def test_default_sdxl_model_is_cheap():
    """Default config at SDXL size (4x128x128, 1280-d text): parameters and FLOPs of one rollout step,
    counted on the meta device; budget: n=10 steps <= 1% of a 30-step CFG SDXL sampling (~406 TFLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = NoiseSequenceRNNConfig()
    assert (cfg.noise_resolution, cfg.text_embed_dim, cfg.cnn_feat_dim, cfg.gru_hidden_size) == (128, 1280, 512, 1024)
    with torch.device("meta"):
        model = NoiseSequenceRNN_v3(cfg)
        x, text = torch.empty(1, 1, 4, 128, 128), torch.empty(1, 1280)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x, text)
    flops = counter.get_total_flops()
    assert 10e6 < params < 100e6
    assert 10 * flops <= 0.01 * 60 * 6.76e12, f"{flops / 1e12:.3f} TFLOPs per step is over the budget"
