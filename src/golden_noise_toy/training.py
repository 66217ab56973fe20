"""Training loops of the toy-world builder: the VAE, the attribute classifier and the text-conditioned UNet.

Every random choice comes from an explicit seeded generator (or `torch.manual_seed` right before it), so a
build is a deterministic function of its preset and seed on a given machine and thread count.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from golden_noise.training.core import warmup_cosine

from .components import AttributeClassifier, encode_token_ids


@contextmanager
def reproducible_torch(threads: int | None = None):
    """The torch settings a byte-reproducible build runs under: deterministic algorithms (the text encoders'
    embedding backward, for one, sums in a thread-timing-dependent order otherwise), denormal floats flushed (tiny
    CPU networks can stall on them) and, if given, a fixed thread count. The deterministic mode and the thread
    count are restored on exit."""
    saved_threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(deterministic)


def seed_generator(seed: int, phase: int) -> torch.Generator:
    """One generator per build phase, so phases do not shift each other's random streams."""
    torch.manual_seed(seed * 1000 + phase)
    return torch.Generator().manual_seed(seed * 1000 + phase)


def progress_bar(total: int, desc: str, disable: bool):
    """A tqdm bar that leaves nothing behind (off when `disable`)."""
    return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True, leave=False)


def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, lr: float, kl_weight: float, crop: int,
              generator: torch.Generator, quiet: bool = False) -> dict:
    """Train the AutoencoderKL on random aligned crops of `images` (N, 3, H, W) in [0, 1] (it is fully
    convolutional, so crops cost less than whole images). Returns the final losses."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    n, _, h, w = images.shape
    vae.train()
    bar = progress_bar(steps, "train VAE", quiet)
    mse = kl = torch.zeros(())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, max(1, steps // 20), steps)
        idx = torch.randint(n, (batch_size,), generator=generator)
        oy, ox = (torch.randint((h - crop) // f + 1, (2,), generator=generator) * f).tolist()
        x = images[idx, :, oy:oy + crop, ox:ox + crop] * 2 - 1  # (B, 3, crop, crop) in [-1, 1]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(mse=f"{mse.item():.4f}")
    bar.close()
    vae.eval()
    return {"vae_mse": round(mse.item(), 5), "vae_kl": round(kl.item(), 4)}


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image: two (N, 4, h, w) tensors (raw VAE latent units)."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        post = vae.encode(images[i:i + batch_size] * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Decode raw VAE latents (N, 4, h, w) to images (N, 3, H, W) in [0, 1]."""
    out = [vae.decode(latents[i:i + batch_size]).sample for i in range(0, len(latents), batch_size)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def train_classifier(classifier: AttributeClassifier, views: list[torch.Tensor], labels: torch.Tensor, steps: int,
                     batch_size: int, lr: float, noise: float, generator: torch.Generator,
                     quiet: bool = False) -> dict:
    """Train on a random one of `views` (each (N, 3, H, W): clean renders, VAE reconstructions, ...) per sample,
    plus Gaussian pixel noise of a random std in [0, noise]. labels: (N, A) attribute indices."""
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    names = list(classifier.config.attributes)
    classifier.train()
    bar = progress_bar(steps, "train reward classifier", quiet)
    loss = torch.zeros(())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, max(1, steps // 20), steps)
        idx = torch.randint(labels.shape[0], (batch_size,), generator=generator)
        view = torch.randint(len(views), (batch_size,), generator=generator)
        x = torch.stack([v[idx] for v in views])[view, torch.arange(batch_size)]  # (B, 3, H, W)
        sigma = noise * torch.rand(batch_size, 1, 1, 1, generator=generator)
        x = (x + sigma * torch.randn(x.shape, generator=generator)).clamp(0, 1)
        logits = classifier(x)
        loss = sum(F.cross_entropy(logits[name], labels[idx, a]) for a, name in enumerate(names))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    classifier.eval()
    return {"classifier_loss": round(loss.item(), 4)}


@torch.no_grad()
def classifier_accuracy(classifier: AttributeClassifier, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-attribute accuracy and the fraction of images with every attribute right."""
    names = list(classifier.config.attributes)
    preds = []
    for i in range(0, len(images), 512):
        logits = classifier(images[i:i + 512])
        preds.append(torch.stack([logits[n].argmax(1) for n in names], dim=1))
    right = torch.cat(preds) == labels  # (N, A)
    out = {n: round(right[:, a].float().mean().item(), 4) for a, n in enumerate(names)}
    out["all"] = round(right.all(1).float().mean().item(), 4)
    return out


@dataclass
class UNetData:
    """The UNet's training set: normalised latent posteriors and each image's caption index."""

    mean: torch.Tensor    # (N, 4, h, w), already (z - latents_mean) / latents_std
    std: torch.Tensor     # (N, 4, h, w), in the same units
    caption: torch.Tensor  # (N,) index into token_ids
    token_ids: torch.Tensor  # (K, 77) every caption's token ids


class EMA:
    """Exponential moving average of parameters, with the usual warmup of the decay."""

    def __init__(self, modules, decay: float):
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def copy_to_params(self):
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def ema_step(loss: torch.Tensor, opt, params, ema, running: float | None, bar) -> float:
    """One optimizer step with the gradient norm clipped to 1 and the EMA updated; returns the running loss (also
    shown on `bar`)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update()
    running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
    bar.update(1)
    bar.set_postfix(loss=f"{running:.4f}")
    return running


def train_unet(unet, te1, te2, data: UNetData, scheduler_config: dict, time_ids: torch.Tensor, steps: int,
               batch_size: int, lr: float, caption_dropout: float, ema_decay: float, min_snr_gamma: float,
               generator: torch.Generator, quiet: bool = False) -> dict:
    """Epsilon-prediction training of the UNet with the text encoders, jointly, on the DDPM process of
    `scheduler_config` (SDXL's betas). Dropped captions get all-zero token and pooled embeddings: what the SDXL
    pipeline feeds the unconditional branch (force_zeros_for_empty_prompt). Leaves the EMA weights in place."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(scheduler_config)
    alphas = noise_sched.alphas_cumprod  # (1000,)
    snr = alphas / (1 - alphas)
    modules = [unet, te1, te2]
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = EMA(modules, ema_decay)
    for m in modules:
        m.train()
    n = data.mean.shape[0]
    bar = progress_bar(steps, "train UNet", quiet)
    running = None
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * warmup_cosine(step, max(1, steps // 20), steps)
        idx = torch.randint(n, (batch_size,), generator=generator)
        z0 = data.mean[idx] + data.std[idx] * torch.randn(data.mean[idx].shape, generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        keep = (torch.rand(batch_size, generator=generator) >= caption_dropout).float()
        caps, inverse = torch.unique(data.caption[idx], return_inverse=True)
        embeds, pooled = encode_token_ids(te1, te2, data.token_ids[caps])
        embeds = embeds[inverse] * keep.view(-1, 1, 1)   # (B, 77, 64)
        pooled = pooled[inverse] * keep.view(-1, 1)      # (B, 32)
        pred = unet(zt, t, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.expand(batch_size, -1)}).sample
        weight = snr[t].clamp(max=min_snr_gamma) / snr[t] if min_snr_gamma > 0 else torch.ones(batch_size)
        loss = (weight * ((pred - noise) ** 2).mean((1, 2, 3))).mean()
        running = ema_step(loss, opt, params, ema, running, bar)
    bar.close()
    ema.copy_to_params()
    for m in modules:
        m.eval()
    return {"unet_loss": round(running or 0.0, 5)}
