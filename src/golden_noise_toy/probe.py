"""Which text embedding tells the RNN what a prompt asks for? A linear probe per kind (diffusion.TEXT_EMBEDDINGS).

For a toy world every caption names one value of each attribute (colour, shape, size, position). A ridge
regression from a text embedding to the one-hot attributes is fitted on the training captions and scored on
held-out captions: an attribute the probe cannot read from unseen captions is one the RNN cannot generalise
the golden change over either (its text path starts with a linear layer)."""
from __future__ import annotations

from typing import Sequence

import torch

from golden_noise.diffusion import TEXT_EMBEDDINGS, encode_prompts, text_embedding
from golden_noise.errors import UserError
from .grammar import parse_prompt


def attribute_targets(captions: Sequence[str], attributes: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Attribute name -> (N,) index of the value each caption names; a caption that names none is an error."""
    targets = {name: [] for name in attributes}
    for caption in captions:
        named = parse_prompt(caption, attributes)
        missing = [name for name in attributes if name not in named]
        if missing:
            raise UserError(f"caption {caption!r} names no {', '.join(missing)}: probe only the world's captions")
        for name in attributes:
            targets[name].append(named[name])
    return {name: torch.tensor(v) for name, v in targets.items()}


def probe_accuracy(features: torch.Tensor, targets: dict[str, torch.Tensor], train: torch.Tensor,
                   ridge: float = 1e-3) -> dict[str, float]:
    """Held-out accuracy per attribute of a ridge probe fitted on the rows where `train` is True."""
    x = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    onehots = [torch.nn.functional.one_hot(t, int(t.max()) + 1).double() for t in targets.values()]
    y = torch.cat(onehots, dim=1)
    xt = x[train]
    weights = torch.linalg.solve(xt.T @ xt + ridge * torch.eye(x.shape[1], dtype=x.dtype), xt.T @ y[train])
    scores = x[~train] @ weights
    out, col = {}, 0
    for name, onehot in zip(targets, onehots):
        k = onehot.shape[1]
        out[name] = (scores[:, col:col + k].argmax(1) == targets[name][~train]).double().mean().item()
        col += k
    return out


@torch.no_grad()
def probe_text_embeddings(pipe, captions: Sequence[str], held_out: Sequence[str],
                          attributes: dict[str, list[str]], kinds: Sequence[str] | None = None) -> dict:
    """{kind: {attribute: held-out accuracy}} for every summary text-embedding kind the pipeline offers (not NPNet's
    flattened prompt_embeds)."""
    kinds = kinds if kinds is not None else [k for k in TEXT_EMBEDDINGS[1:] if k != "prompt_embeds"]
    captions = list(dict.fromkeys(list(captions) + list(held_out)))
    held = set(held_out)
    train = torch.tensor([c not in held for c in captions])
    if train.all() or not train.any():
        raise UserError("the probe needs both training and held-out captions")
    targets = attribute_targets(captions, attributes)
    cond = encode_prompts(pipe, captions, with_uncond=False)
    return {kind: probe_accuracy(text_embedding(pipe, captions, cond, kind).cpu(), targets, train)
            for kind in kinds}
