"""Helpers shared by the scorer modules: device/dtype choice, hub-or-local paths, batching, CLIP towers."""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Iterator, Sequence

import torch

from ..errors import UserError, one_line
from ..io import looks_local
from ..runtime import resolve_device, resolve_dtype

# a reward path ending like this is a local file, never a hub id (e.g. `models/HPS_v2.pt`)
REWARD_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".json")


def device_and_dtype(device="auto", dtype=None) -> tuple[torch.device, torch.dtype]:
    """Resolve the scorer's device and compute dtype: float16 on CUDA and float32 elsewhere unless given."""
    device = device if isinstance(device, torch.device) else resolve_device(device or "auto")
    if dtype in (None, "auto"):
        return device, torch.float16 if device.type == "cuda" else torch.float32
    return device, resolve_dtype(dtype)


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a reduced dtype (the weights stay float32, as the reference HPSv2 code does)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    """Consecutive slices of at most `size` items."""
    size = max(1, int(size))
    for start in range(0, len(items), size):
        yield items[start:start + size]


def check_local(path: str, metric: str) -> str:
    """Expand `~` and insist the local path exists (a UserError names the metric and the flag)."""
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise UserError(f"{metric}: model path {path} does not exist: pass an existing file or folder with "
                        f"--reward_path {metric}=PATH (or a hub id like owner/name)")
    return expanded


def hub_file(repo_id: str, filename: str, metric: str) -> str:
    """Download (or reuse the cached) `filename` from hub repo `repo_id`; failures become a UserError."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename)
    except Exception as e:  # offline, gated, missing file
        raise UserError(f"{metric}: cannot fetch {filename} from the hub repo {repo_id} ({type(e).__name__}): "
                        f"download it once and pass --reward_path {metric}=PATH") from None


def load_clip(model_id: str, processor_id: str | None, metric: str):
    """A transformers `CLIPModel` (eval, float32) and `CLIPProcessor` from hub ids or local folders."""
    from transformers import CLIPModel, CLIPProcessor

    if looks_local(model_id, REWARD_FILE_SUFFIXES):
        model_id = check_local(model_id, metric)
    processor_id = processor_id or model_id
    if looks_local(processor_id, REWARD_FILE_SUFFIXES):
        processor_id = check_local(processor_id, metric)
    try:
        model = CLIPModel.from_pretrained(model_id, dtype=torch.float32)
        processor = CLIPProcessor.from_pretrained(processor_id)
    except (OSError, ValueError) as e:
        raise UserError(f"{metric}: cannot load the CLIP model {model_id} / processor {processor_id} "
                        f"({one_line(e, 200)}): pass a local copy with "
                        f"--reward_path {metric}=PATH") from None
    return model.eval().requires_grad_(False), processor


def has_processor_files(folder: str) -> bool:
    """True when a local model folder also holds a saved tokenizer (so its processor can be loaded from it)."""
    return os.path.isdir(folder) and any(
        os.path.exists(os.path.join(folder, name)) for name in ("tokenizer.json", "tokenizer_config.json"))


class ClipFeatures:
    """Unit-norm image and text embeddings of a transformers CLIP model, with the text side cached by prompt."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype):
        self.model, self.processor = model.to(device), processor
        self.device, self.dtype = device, dtype
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def images(self, images: Sequence) -> torch.Tensor:
        """(B, D) float32 unit vectors: the projected pooled vision output."""
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        with autocast(self.device, self.dtype):
            pooled = self.model.vision_model(pixel_values=pixels.to(self.device)).pooler_output
            emb = self.model.visual_projection(pooled)
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, D) float32 unit vectors: the projected pooled text output (truncated to 77 tokens)."""
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            tok = self.processor(text=todo, return_tensors="pt", padding=True, truncation=True, max_length=77)
            with autocast(self.device, self.dtype):
                pooled = self.model.text_model(input_ids=tok["input_ids"].to(self.device),
                                               attention_mask=tok["attention_mask"].to(self.device)).pooler_output
                emb = self.model.text_projection(pooled)
            for prompt, vec in zip(todo, torch.nn.functional.normalize(emb.float(), dim=-1)):
                self._text_cache[prompt] = vec
        return torch.stack([self._text_cache[p] for p in prompts])

    @torch.no_grad()
    def cosines(self, images: Sequence, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
        """(N,) cosine of each image with its prompt, computed `batch_size` pairs at a time."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = [(self.images(images[i:i + batch_size]) * self.texts(prompts[i:i + batch_size])).sum(-1)
               for i in range(0, len(images), max(1, batch_size))]
        return torch.cat(out).cpu() if out else torch.zeros(0)
