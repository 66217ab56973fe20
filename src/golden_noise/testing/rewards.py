"""Tiny random reward models built offline (no hub), for tests, benchmarks and offline dry runs.

Each has the real architecture family and file layout of its full-size model, so the scorers load them
through exactly the code paths they use for the real weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..rewards.aesthetic import MLP_FILES, AestheticMLP
from .pipelines import byte_level_clip_tokenizer

# An open_clip ViT CLIP with the real input size (224 px) and tokenizer (CLIP BPE, 77 tokens), but width 32.
TINY_HPS_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def tiny_state_dict(module: torch.nn.Module, seed: int, noise: float = 0.05) -> dict:
    """The module's state dict with every float tensor perturbed (so norms and scales are not at their init)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + noise * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


def save_tiny_hps(folder: str | Path, seed: int = 0, name: str = "HPS-tiny") -> tuple[Path, Path]:
    """Write `{name}.json` (an open_clip model config) and `HPS_v2.1_compressed.pt` ({'state_dict': ...})."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_HPS_CONFIG, indent=2), encoding="utf-8")
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    checkpoint = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": tiny_state_dict(model, seed + 1)}, checkpoint)
    return checkpoint, config


def tiny_clip(seed: int = 0, image_size: int = 32, projection_dim: int = 16):
    """A random transformers `CLIPModel` and a `CLIPProcessor` with the byte-level tokenizer (offline)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, \
        CLIPVisionConfig

    tokenizer = byte_level_clip_tokenizer()
    n = len(tokenizer)
    text = CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=n - 2, eos_token_id=n - 1,
                          pad_token_id=n - 1)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                 projection_dim=projection_dim)).eval()
    model.load_state_dict(tiny_state_dict(model, seed + 1))
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    return model, processor


def save_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny CLIPModel + processor (the layout of PickScore_v1 / clip-vit-large-patch14) to `folder`."""
    model, processor = tiny_clip(seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)


def save_tiny_aesthetic(folder: str | Path, seed: int = 0) -> Path:
    """A folder with a tiny CLIP and `sac+logos+ava1-l14-linearMSE.pth` sized to its embedding."""
    folder = save_tiny_clip(folder, seed)
    torch.manual_seed(seed + 2)
    mlp = AestheticMLP(16)
    torch.save(tiny_state_dict(mlp, seed + 3), folder / MLP_FILES[0])
    return folder
