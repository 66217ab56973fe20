"""Reward models on tiny offline models: HPSv2 equals the reference `hpsv2` code; the others equal CLIP math."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from golden_noise.errors import UserError
from golden_noise.rewards.base import available_rewards, load_reward
from golden_noise.testing.rewards import TINY_HPS_CONFIG, save_tiny_aesthetic, save_tiny_clip, save_tiny_hps

PROMPTS = [
    "a red cube on a table",
    "A photo of an astronaut riding a horse on the moon, highly detailed, trending on artstation, " * 4,  # > 77 tok
    "café über naïve — 😀 «quoted»",
    "x",
    "two dogs playing in the snow",
    "a lighthouse at dusk",
]


def _images() -> list[Image.Image]:
    """Images of the sizes and modes the scorers meet: square, wide, tall, tiny, large, grayscale, palette."""
    rng = np.random.default_rng(0)
    shapes = [(16, 16), (200, 300), (512, 64), (224, 224), (1024, 1024), (96, 96)]
    ims = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    ims[5] = ims[5].convert("L")
    ims.append(Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)).convert("P"))
    return ims


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    return save_tiny_hps(tmp_path_factory.mktemp("hps"), seed=0)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=0)


def _reference_model(config_path):
    """The reference's own model + validation transform, built exactly as `hpsv2.img_score.initialize_model`
    does, but on the tiny architecture and without the LAION download (pretrained=None)."""
    from hpsv2.src.open_clip import factory as ref_factory

    ref_factory.add_model_config(config_path)
    model, _, preprocess_val = ref_factory.create_model_and_transforms(
        config_path.stem, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False)
    return model, preprocess_val


def test_hpsv2_matches_reference_scoring(tiny_hps, tmp_path, monkeypatch):
    """Our batched scorer and the reference's `hpsv2.img_score.score` agree to 1e-5 on identical weights."""
    import hpsv2.img_score as ref

    checkpoint, config = tiny_hps
    model, preprocess_val = _reference_model(config)
    monkeypatch.setattr(ref, "model_dict", {"model": model, "preprocess_val": preprocess_val})
    monkeypatch.setattr(ref, "root_path", str(tmp_path / "hps_root"))
    images = _images()
    prompts = (PROMPTS * 2)[:len(images)]
    # The reference scores one image against one prompt per call, loading the checkpoint itself (cp=...).
    expected = [float(ref.score(im, p, cp=str(checkpoint))[0]) for im, p in zip(images, prompts)]

    ours = load_reward("hpsv2", path=str(checkpoint), architecture=str(config), device="cpu", batch_size=3)
    got = ours.score(images, prompts)
    assert np.max(np.abs(np.array(got) - np.array(expected))) <= 1e-5, (got, expected)
    assert np.std(expected) > 1e-3  # the tiny model does discriminate, so agreement is not trivial
    # Batch size and the text cache do not change a score.
    again = load_reward("hpsv2", path=str(checkpoint), architecture=str(config), device="cpu", batch_size=1)
    assert np.allclose(again.score(images[::-1], prompts[::-1]), got[::-1], atol=1e-6)


def test_hps_preprocess_equals_reference_transform(tiny_hps):
    """Resize-longest-to-224 + centred zero pad + OpenAI normalisation, bit for bit."""
    from hpsv2.src.open_clip.transform import image_transform

    from golden_noise.rewards.hpsv2 import hps_preprocess

    reference = image_transform(224, is_train=False, resize_longest_max=True)
    for im in _images():
        assert torch.equal(hps_preprocess(im), reference(im.convert("RGB")))


def test_hps_checkpoint_and_version_errors(tiny_hps, tmp_path):
    checkpoint, config = tiny_hps
    with pytest.raises(UserError, match="does not exist"):
        load_reward("hpsv2", path=str(tmp_path / "missing.pt"), architecture=str(config), device="cpu")
    with pytest.raises(UserError, match="hps_version"):
        load_reward("hpsv2", path=str(checkpoint), version="v3", architecture=str(config), device="cpu")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_reward("hpsv2", path=str(bad), architecture=str(config), device="cpu")
    small = dict(TINY_HPS_CONFIG, embed_dim=8)
    other = tmp_path / "HPS-other.json"
    other.write_text(__import__("json").dumps(small))
    with pytest.raises(UserError, match="does not fit"):
        load_reward("hpsv2", path=str(checkpoint), architecture=str(other), device="cpu")
    # A folder holding the version's checkpoint file is accepted as the path.
    assert load_reward("hpsv2", path=str(checkpoint.parent), architecture=str(config), device="cpu").checkpoint \
        == str(checkpoint)


def _clip_math(folder, images, prompts):
    """Independent reference: CLIPModel.forward's logits_per_image diagonal and image embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = proc(text=list(prompts), images=[im.convert("RGB") for im in images], return_tensors="pt",
                  padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = model(**inputs)
    logits = torch.diagonal(out.logits_per_image)
    return logits, model.logit_scale.exp().item(), out.image_embeds


def test_pickscore_and_clipscore_on_tiny_clip(tiny_clip_dir):
    images, prompts = _images()[:5], PROMPTS[:5]
    logits, scale, _ = _clip_math(tiny_clip_dir, images, prompts)
    pick = load_reward("pickscore", path=str(tiny_clip_dir), device="cpu", batch_size=2).score(images, prompts)
    assert np.allclose(pick, logits.numpy(), atol=1e-5)
    clip = load_reward("clipscore", path=str(tiny_clip_dir), device="cpu", batch_size=4).score(images, prompts)
    assert np.allclose(clip, (100 * (logits / scale).clamp(min=0)).numpy(), atol=1e-4)
    assert len(set(np.round(pick, 6))) == len(pick)


def test_aesthetic_on_tiny_models(tmp_path):
    from golden_noise.rewards.aesthetic import MLP_FILES, load_mlp

    folder = save_tiny_aesthetic(tmp_path / "aesthetic", seed=0)
    images = _images()[:4]
    _, _, embeds = _clip_math(folder, images, PROMPTS[:4])
    mlp = load_mlp(str(folder / MLP_FILES[0]))
    with torch.no_grad():
        expected = mlp(torch.nn.functional.normalize(embeds, dim=-1)).squeeze(-1).numpy()
    assert np.ptp(expected) > 1e-3
    got = load_reward("aesthetic", path=str(folder), device="cpu", batch_size=3).score(images, PROMPTS[:4])
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The MLP file alone plus a separate CLIP location gives the same numbers; the prompts play no part.
    alone = load_reward("aesthetic", path=str(folder / MLP_FILES[0]), clip=str(folder), device="cpu")
    assert np.allclose(alone.score(images, ["other"] * 4), expected, rtol=1e-5, atol=1e-5)


def test_registry_and_load_errors(tmp_path):
    assert {"hpsv2", "pickscore", "clipscore", "aesthetic"} <= set(available_rewards())
    with pytest.raises(UserError, match="unknown metric"):
        load_reward("imagereward")
    with pytest.raises(UserError, match="does not exist"):
        load_reward("pickscore", path=str(tmp_path / "nope"), device="cpu")
    with pytest.raises(UserError, match="none of"):
        load_reward("aesthetic", path=str(tmp_path), device="cpu")


def test_load_errors_with_empty_messages_are_one_line(tiny_hps, tiny_clip_dir, tmp_path, monkeypatch):
    """Library errors without a message become one-line UserErrors naming their type (no IndexError)."""
    import transformers

    from golden_noise.rewards.aesthetic import load_mlp
    from golden_noise.rewards.hpsv2 import load_hps_state_dict

    def silent_failure(*args, **kwargs):
        raise RuntimeError()

    monkeypatch.setattr(torch, "load", silent_failure)
    for load in (load_mlp, load_hps_state_dict):
        with pytest.raises(UserError, match=r"cannot read|cannot load") as info:
            load(str(tiny_hps[0]))
        assert "(RuntimeError)" in str(info.value) and "\n" not in str(info.value)

    def no_model(*args, **kwargs):
        raise OSError("")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", no_model)
    with pytest.raises(UserError, match=r"clipscore: cannot load the CLIP model .* \(OSError\): pass a local copy"):
        load_reward("clipscore", path=str(tiny_clip_dir), device="cpu")


def test_reward_paths_follow_the_one_local_path_rule(tmp_path):
    """golden_noise.io.looks_local with the model-file suffixes: `dir/weights.safetensors` is a missing local file
    (not a hub id to download), `owner/name` a hub id."""
    from golden_noise.io import looks_local
    from golden_noise.rewards._common import REWARD_FILE_SUFFIXES

    assert looks_local("models/PickScore.safetensors", REWARD_FILE_SUFFIXES)
    assert looks_local("ckpt/HPS_v2.PT", REWARD_FILE_SUFFIXES)
    assert not looks_local("yuvalkirstain/PickScore_v1", REWARD_FILE_SUFFIXES)
    assert not looks_local("PickScore_v1", REWARD_FILE_SUFFIXES)
    for metric in ("pickscore", "clipscore"):
        with pytest.raises(UserError, match=rf"{metric}: model path models/weights\.safetensors does not exist"):
            load_reward(metric, path="models/weights.safetensors", device="cpu")


USER_REWARDS = '''
import numpy as np


class Contrast:
    """Standard deviation of the grey levels; takes every option."""

    def __init__(self, **options):
        self.options = options

    def score(self, images, prompts):
        return [float(np.asarray(im.convert("L"), dtype=np.float64).std()) for im in images]


def make_scaled(batch_size=1, scale=2.0):
    """A factory taking only some options."""
    class Scaled:
        def score(self, images, prompts):
            return [scale * batch_size] * len(images)
    return Scaled()


class Strings:
    def score(self, images, prompts):
        return ["high"] * len(images)
'''


def test_user_reward_loads_through_the_registry(tmp_path):
    """`FILE.py:NAME` works wherever a reward name does (load_reward / reward_factory): built with the options its
    signature accepts, its scores checked."""
    from golden_noise.rewards.base import is_reward_name, reward_factory

    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS, encoding="utf-8")
    images = _images()[:3]
    contrast = load_reward(f"{path}:Contrast", path="w.pt", device="cpu", batch_size=4)
    assert contrast.reward.options == {"path": "w.pt", "device": "cpu", "batch_size": 4}
    expected = [float(np.asarray(im.convert("L"), dtype=np.float64).std()) for im in images]
    assert contrast.score(images, PROMPTS[:3]) == expected and np.ptp(expected) > 0
    scaled = load_reward(f"{path}:make_scaled", path="ignored", device="cpu", batch_size=3)
    assert scaled.score(images, PROMPTS[:3]) == [6.0, 6.0, 6.0]
    with pytest.raises(UserError, match="must return a list of numbers"):
        load_reward(f"{path}:Strings").score(images, PROMPTS[:3])
    assert reward_factory(f"{path}:Contrast") is not reward_factory(f"{path}:make_scaled")
    assert is_reward_name(f"{path}:Contrast") and is_reward_name("hpsv2") and not is_reward_name("imagereward")
    assert not is_reward_name(f"{path}:1bad") and not is_reward_name("rewards.txt:Name")
