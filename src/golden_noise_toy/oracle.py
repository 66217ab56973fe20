"""Does golden noise help in a world? Score images sampled from random noise ("standard") and from the real
golden step applied n times ("oracle") with a reward, paired by (prompt, seed), with a bootstrap CI of the gain
and the win rate of golden_noise.stats (the statistics every stage reports)."""
from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from golden_noise.diffusion import encode_prompts, latent_shape, sample_images, seeded_noise
from golden_noise.golden import GoldenConfig, golden_step
from golden_noise.stats import bootstrap_ci, win_rate
from golden_noise.tables import format_table as text_table


@torch.no_grad()
def golden_noises(pipe, prompts: Sequence[str], seeds: Sequence[int], n: int, config: GoldenConfig,
                  batch_size: int = 50, quiet: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T (B, C, H, W), golden sequence (B, n, C, H, W)) for each (prompt, seed) pair."""
    step = golden_step(pipe, config)
    x = seeded_noise(seeds, latent_shape(pipe), device=pipe.device)
    seqs = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="golden noise", disable=quiet, leave=False):
        cond = encode_prompts(pipe, prompts[i:i + batch_size])
        seqs.append(step.sequence(x[i:i + batch_size], cond, n))
    return x, torch.cat(seqs)


def _scores(pipe, reward, prompts, latents, steps, guidance, batch_size) -> tuple[torch.Tensor, torch.Tensor]:
    scores, correct = [], []
    for i in range(0, len(prompts), batch_size):
        images = sample_images(pipe, prompts[i:i + batch_size], latents[i:i + batch_size],
                               num_inference_steps=steps, guidance_scale=guidance)
        if hasattr(reward, "details"):
            d = reward.details(images, prompts[i:i + batch_size])
            scores += d["score"]
            correct += d["all_correct"]
        else:
            scores += reward.score(images, prompts[i:i + batch_size])
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(correct, dtype=torch.float64)


def measure_oracle_gain(pipe, reward, prompts: Sequence[str], seeds: Sequence[int], n_values: Sequence[int] = (1, 2, 3),
                        guidance_scales: Sequence[float] = (1.0, 2.0, 3.0), num_inference_steps: int = 10,
                        config: GoldenConfig | None = None, batch_size: int = 50, resamples: int = 2000,
                        quiet: bool = False) -> dict:
    """Mean reward of standard vs oracle images for every (guidance scale, n), with the paired gain's 95% CI."""
    config = config or GoldenConfig()
    prompts = list(prompts)
    x, seq = golden_noises(pipe, prompts, seeds, max(n_values), config, batch_size, quiet)
    delta = (seq[:, 0] - x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1)
    rows = []
    bar = tqdm(total=len(guidance_scales) * (1 + len(n_values)), desc="sample + score", disable=quiet, leave=False)
    for g in guidance_scales:
        base, base_ok = _scores(pipe, reward, prompts, x, num_inference_steps, g, batch_size)
        bar.update(1)
        for n in n_values:
            gold, gold_ok = _scores(pipe, reward, prompts, seq[:, n - 1], num_inference_steps, g, batch_size)
            bar.update(1)
            diff = (gold - base).numpy()  # (pairs,) float64
            lo, hi = bootstrap_ci(diff, samples=resamples, seed=0)
            row = {"guidance_scale": g, "n": n, "standard": round(base.mean().item(), 4),
                   "oracle": round(gold.mean().item(), 4), "gain": round(float(diff.mean()), 4),
                   "ci95": [round(lo, 4), round(hi, 4)], "win_rate": round(win_rate(diff), 3)}
            if len(base_ok):
                row.update(standard_accuracy=round(base_ok.mean().item(), 4),
                           oracle_accuracy=round(gold_ok.mean().item(), 4))
            rows.append(row)
    bar.close()
    return {"pairs": len(prompts), "num_inference_steps": num_inference_steps, "golden": config.to_dict(),
            "relative_delta_n1": round(delta.mean().item(), 4), "results": rows}


def format_table(result: dict) -> str:
    """The measurement as a text table (win = share of pairs the oracle wins, ties counted as half)."""
    header = ["cfg", "n", "standard", "oracle", "gain", "95% CI", "win", "acc std", "acc orc"]
    rows = [[f"{r['guidance_scale']:g}", r["n"], f"{r['standard']:.4f}", f"{r['oracle']:.4f}", f"{r['gain']:+.4f}",
             f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]", f"{r['win_rate']:.3f}",
             f"{r.get('standard_accuracy', float('nan')):.3f}", f"{r.get('oracle_accuracy', float('nan')):.3f}"]
            for r in result["results"]]
    title = (f"{result['pairs']} pairs, {result['num_inference_steps']} sampling steps, golden step "
             f"{result['golden']}, |x'_1 - x| / |x| = {result['relative_delta_n1']:.3f}")
    return title + "\n" + text_table(rows, header=header, align_right=range(len(header)))
