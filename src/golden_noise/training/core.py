"""Training helpers for the noise models (stage 3): data order, subsets, losses, LR schedule, validation summaries."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Sampler

from ..errors import UserError
from ..runtime import get_logger


class EpochSampler(Sampler[int]):
    """A random permutation of range(n) per epoch, drawn from its own generator seeded with seed + epoch:
    the data order depends only on (seed, epoch), so a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.n


def keep_reward_gain(data, minimum: float):
    """The training samples of `data` (a dataset.reader.SequenceData) whose recorded reward_gain is >= `minimum`
    (NPNet's filter: keep a pair only when the golden image scores higher), as a subset of `data.train`; logs how
    many are kept."""
    train = data.train
    gains = data.reward_gains()
    if gains is None:
        raise UserError(f"--min_reward_gain needs reward scores, but the dataset {data.root} has no reward_gain "
                        "column: generate the dataset with generate_npd_series.py --score_metric METRIC (a new "
                        "--output_dir), or drop --min_reward_gain")
    missing = [i for i in train.ids if i not in gains]
    if missing:
        raise UserError(f"{data.root} has no reward_gain for sample {missing[0]} ({len(missing)} in all): rerun "
                        "generate_npd_series.py into that dataset to finish it")
    values = [gains[i] for i in train.ids]
    kept = train.subset([i for i in train.ids if gains[i] >= minimum])
    if not len(kept):
        raise UserError(f"--min_reward_gain {minimum:g} keeps none of the {len(values)} training samples (their "
                        f"reward_gain lies in [{min(values):.4g}, {max(values):.4g}]): lower it")
    get_logger("train_rnn_model_v3").info(
        "--min_reward_gain %g keeps %d of %d training samples (reward_gain recorded in %s; the validation split is "
        "unchanged)", minimum, len(kept), len(values), data.root)
    return kept


def keep_fraction(train, fraction: float):
    """The training samples whose id ranks in the first round(fraction * N) by a hash of the id (at least one), as a
    copy of the `SequenceDataset`: deterministic, independent of order and process count, and nested (a smaller
    fraction's samples are in every larger one's), for either format (`SequenceDataset.subset`); logs how many are
    kept."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--train_fraction must be in (0, 1], got {fraction}")
    ranked = sorted(train.ids, key=lambda i: hashlib.sha256(f"golden-noise-subset:{i}".encode()).hexdigest())
    kept = train.subset(ranked[:max(1, round(fraction * len(ranked)))])
    get_logger("train_rnn_model_v3").info("--train_fraction %g keeps %d of %d training samples (the validation split "
                                          "is unchanged)", fraction, len(kept), len(train))
    return kept


def training_pair(source: torch.Tensor, golden: torch.Tensor, one_step: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(model input, target) of a batch: the RNN's teacher-forcing inputs (B, n, C, H, W) and x'_1..x'_n, or for a
    one-step model (direct, npnet) x_T (B, C, H, W) and x'_n (B, C, H, W)."""
    if one_step:
        return source, golden[:, -1]
    return teacher_forcing_inputs(source, golden), golden


def teacher_forcing_inputs(source: torch.Tensor, golden: torch.Tensor) -> torch.Tensor:
    """source (B, C, H, W), golden (B, n, C, H, W) -> x_prev (B, n, C, H, W) = [x_T, x'_1, ..., x'_{n-1}]."""
    return torch.cat([source[:, None], golden[:, :-1]], dim=1)


def sequence_loss(mean: torch.Tensor, logvar: torch.Tensor | None, target: torch.Tensor, valid: torch.Tensor,
                  kl_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Loss terms averaged over the valid samples of a batch (all (B, T, C, H, W), valid (B,)).

    recon: MSE, or the Gaussian NLL (0.5 * (logvar + err^2 / var), constant dropped) with a logvar;
    kl: KL(N(mean, var) || N(0, I)) per element (var = 1 without a logvar); loss = recon + kl_weight * kl.
    """
    mean, target = mean.float(), target.float()
    w = valid.float()  # (B,)
    denom = w.sum().clamp_min(1.0)
    per = lambda x: (x.flatten(1).mean(dim=1) * w).sum() / denom  # noqa: E731  (B, ...) -> scalar
    err2 = (mean - target).pow(2)
    mse = per(err2)
    if logvar is not None:
        logvar = logvar.float()
        recon = per(0.5 * (logvar + err2 * torch.exp(-logvar)))
        kl = per(0.5 * (mean.pow(2) + torch.exp(logvar) - 1.0 - logvar))
    else:
        recon = mse
        kl = per(0.5 * mean.pow(2))
    loss = recon + kl_weight * kl if kl_weight else recon
    return {"loss": loss, "recon": recon, "mse": mse, "kl": kl}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """The LR multiplier at `step`: linear warmup from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio`
    at `total_steps` (the one warmup-cosine rule: stage 3 and the toy world's builder use it)."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine_schedule(optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> LambdaLR:
    """A LambdaLR following `warmup_cosine`."""
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, min_lr_ratio))


@torch.no_grad()
def validation_errors(model, batch: dict) -> dict[str, torch.Tensor]:
    """Per-sample, per-step mean squared errors (B, n) of one batch, model vs the identity baselines.

    tf_model / tf_identity: teacher forcing, prediction of x'_k from the true x'_{k-1} vs x'_{k-1} itself.
    roll_model / roll_identity: autoregressive rollout x-hat'_k from x_T alone vs x_T itself.
    A one-step model (direct, npnet) predicts x'_n alone: its errors are (B, 1), the step n for both.
    """
    source, golden, text = batch["source"], batch["golden"], batch["text"]  # (B,C,H,W) (B,n,C,H,W) (B,P)
    mse = lambda a, b: (a.float() - b.float()).pow(2).flatten(2).mean(dim=2)  # noqa: E731  -> (B, n)
    if getattr(model, "one_step", False):
        pred = model.generate_sequence(source, text, golden.shape[1])  # (B, 1, C, H, W)
        err, base = mse(pred, golden[:, -1:]), mse(source[:, None], golden[:, -1:])
        return {"tf_model": err, "tf_identity": base, "roll_model": err, "roll_identity": base}
    x_prev = teacher_forcing_inputs(source, golden)  # (B, n, C, H, W)
    was_training = model.training
    model.eval()
    try:
        mean, _ = model(x_prev, text)
    finally:
        model.train(was_training)
    rollout = model.generate_sequence(source, text, golden.shape[1])  # (B, n, C, H, W)
    return {"tf_model": mse(mean, golden), "tf_identity": mse(x_prev, golden),
            "roll_model": mse(rollout, golden), "roll_identity": mse(source[:, None].expand_as(golden), golden)}


def explained(model_err: float, baseline_err: float) -> float:
    """1 - model / baseline: the fraction of the baseline's error (the golden change) the model explains."""
    return 1.0 - model_err / baseline_err if baseline_err > 0 else float("nan")


def summarize_validation(errors: dict[str, torch.Tensor], num_steps: int | None = None) -> dict:
    """Turn gathered per-sample errors {name: (V, n)} into the validation report; `num_steps` > n: the errors are
    of the last n of that many steps (a one-step model's (V, 1) errors are of step num_steps)."""
    v, n = errors["tf_model"].shape
    first = (num_steps or n) - n  # steps before the first one measured
    means = {k: e.double().mean(dim=0) for k, e in errors.items()}  # (n,) each

    def per_step(m: str, b: str) -> list[dict]:
        return [{"step": first + k + 1, "model_mse": means[m][k].item(), "baseline_mse": means[b][k].item(),
                 "explained_fraction": explained(means[m][k].item(), means[b][k].item())} for k in range(n)]

    tf_model, tf_id = means["tf_model"].mean().item(), means["tf_identity"].mean().item()
    return {
        "num_samples": v,
        "num_steps": first + n,
        "note": "mse = mean squared error per element (||.||^2 / (C*H*W)), averaged over the samples; "
                "explained_fraction = 1 - model_mse / baseline_mse",
        "teacher_forcing": {"baseline": "identity: x'_k predicted as the true x'_{k-1}",
                            "per_step": per_step("tf_model", "tf_identity"), "model_mse": tf_model,
                            "baseline_mse": tf_id, "explained_fraction": explained(tf_model, tf_id)},
        "rollout": {"baseline": "x_T unchanged", "per_step": per_step("roll_model", "roll_identity")},
        "final_step": {"step": first + n, "model_mse": means["roll_model"][-1].item(),
                       "baseline_mse": means["roll_identity"][-1].item(),
                       "explained_fraction": explained(means["roll_model"][-1].item(),
                                                       means["roll_identity"][-1].item())},
    }


def what_is_kept(last_checkpoint: Path | None) -> str:
    """How a stopped training can go on: its last good checkpoint, if any."""
    return (f"the last good checkpoint {last_checkpoint} is intact (resume with --resume_from_checkpoint latest)"
            if last_checkpoint else "no checkpoint was written yet")


def check_finite(value: torch.Tensor, what: str, step: int, last_checkpoint: Path | None) -> None:
    """Stop training with a clear message when a loss or gradient norm is NaN/inf."""
    if torch.isfinite(value).all():
        return
    raise UserError(f"non-finite {what} ({value.flatten()[0].item()}) at step {step}: training stopped, "
                    f"{what_is_kept(last_checkpoint)}; lower --learning_rate, use --mixed_precision no/bf16, or check "
                    "the dataset")


def flat_hparams(d: dict) -> dict:
    """Make a config tensorboard's hparams accept: lists, None and paths become strings."""
    out = {}
    for k, v in d.items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
