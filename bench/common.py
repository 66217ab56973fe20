"""Shared helpers of the bench scripts: SDXL's public configs, FLOP counting on the meta device, a UNet
forward timer, peak memory, and printing/saving the figures.

Every bench prints ratios measured side by side in one run: absolute times on shared CPUs are noise.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# SDXL base 1.0 unet/config.json (stabilityai/stable-diffusion-xl-base-1.0): everything that shapes compute.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, act_fn="silu", flip_sin_to_cos=True,
    freq_shift=0, norm_eps=1e-5)
# SDXL's VAE (vae/config.json; the same architecture as SD's KL-f8 VAE).
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    act_fn="silu", sample_size=1024, scaling_factor=0.13025)
# text_encoder (CLIP ViT-L/14 text) and text_encoder_2 (OpenCLIP ViT-bigG/14 text, with projection).
SDXL_TEXT_ENCODER_CONFIGS = (
    dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
         max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
         max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
SDXL_TEXT_TOKENS, SDXL_TEXT_DIM, SDXL_POOLED_DIM = 77, 2048, 1280
SDXL_UNET_TFLOPS_1024 = 6.76  # DESIGN.md: one forward at batch 1, 1024^2, counted with FlopCounterMode


def build_sdxl_unet(config: dict | None = None, device="meta", dtype=torch.float32):
    """An SDXL-architecture UNet2DConditionModel with random weights (no download); `device="meta"` allocates
    nothing, a CUDA device initialises the weights there directly."""
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        unet = UNet2DConditionModel(**(config or SDXL_UNET_CONFIG))
    unet = unet.to(device)  # anything a constructor put on the CPU explicitly
    return (unet if dtype == torch.float32 else unet.to(dtype)).eval().requires_grad_(False)


def build_sdxl_vae(config: dict | None = None, device="meta", dtype=torch.float32):
    """SDXL's AutoencoderKL architecture with random weights."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL(**(config or SDXL_VAE_CONFIG))
    vae = vae.to(device)
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval().requires_grad_(False)


def random_conditioning(unet, batch: int, height: int, width: int, tokens: int = SDXL_TEXT_TOKENS,
                        device=None, dtype=None, with_uncond: bool = True, seed: int = 0):
    """A `Conditioning` of random text tensors with the shapes `unet` expects (no text encoders needed)."""
    from golden_noise.diffusion import Conditioning, sdxl_time_ids

    device = device if device is not None else unet.device
    dtype = dtype or unet.dtype
    g = torch.Generator("cpu").manual_seed(seed)
    d = unet.config.cross_attention_dim
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    embeds, pooled = rand(batch, tokens, d), rand(batch, pooled_dim)  # (B, 77, D), (B, P)
    uncond_embeds = rand(batch, tokens, d) if with_uncond else None
    uncond_pooled = rand(batch, pooled_dim) if with_uncond else None
    return Conditioning(embeds, uncond_embeds, pooled, uncond_pooled,
                        sdxl_time_ids(height, width, batch, device=device, dtype=dtype))


def tiny_pipeline(**kwargs):
    """`build_tiny_sdxl_pipeline(**kwargs)` with its progress bars off, as `load_pipeline` leaves them."""
    from golden_noise.testing.pipelines import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of `fn(*args, **kwargs)` counted by `torch.utils.flop_counter` (meta tensors are fine)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def unet_forward_flops(unet, batch: int, latent_hw: tuple[int, int], pixel_hw: tuple[int, int]) -> int:
    """FLOPs of one UNet forward at `batch` on latents `latent_hw` (on the UNet's device, e.g. meta)."""
    cond = random_conditioning(unet, batch, *pixel_hw, with_uncond=False)
    x = torch.empty(batch, unet.config.in_channels, *latent_hw, device=unet.device, dtype=unet.dtype)
    with torch.no_grad():
        return count_flops(unet, x, 901, **cond.branch("cond"), return_dict=False)


def sync(device) -> None:
    """Wait for queued GPU work, so wall-clock timings are real."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class UNetTimer:
    """Wraps `unet.forward` (an instance attribute, so the module and the pipeline stay untouched) and adds up
    the wall time, the calls and the samples (batch rows) of every forward."""

    def __init__(self, unet):
        self.unet = unet
        self.seconds = 0.0
        self.calls = 0
        self.samples = 0

    def __enter__(self) -> "UNetTimer":
        inner = self.unet.forward
        device = self.unet.device

        def timed(sample, *args, **kwargs):
            sync(device)
            t0 = time.perf_counter()
            out = inner(sample, *args, **kwargs)
            sync(device)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            self.samples += sample.shape[0]
            return out

        self.unet.forward = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.unet.forward  # back to the class's method


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (MiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def write_loose_dataset(root: Path, n: int, steps: int, shape, dim: int, batch_size: int = 8,
                        dtype=torch.float16) -> Path:
    """A format-1 sequence dataset (loose files per sample, what stage 2 wrote before the sharded format) of random
    tensors in the storage dtype."""
    from golden_noise.dataset import format as F

    g = torch.Generator().manual_seed(0)
    for i in range(n):
        F.write_loose_sample(root, i, {"source_noise_file": torch.randn(shape, generator=g).to(dtype),
                                       "golden_sequence_file": torch.randn(steps, *shape, generator=g).to(dtype),
                                       "text_embedding_file": torch.randn(dim, generator=g).to(dtype)})
    F.write_metadata(root, [{"id": i, "prompt": f"prompt {i}", "seed": i, "num_steps": steps} for i in range(n)])
    F.write_run_config(root, {"format_version": F.LOOSE_FORMAT_VERSION, "base_model_id": "bench", "num_steps": steps,
                              "latent_shape": list(shape), "storage_dtype": str(dtype).replace("torch.", ""),
                              "start_seed": 0, "text_embedding": {"kind": "pooled", "dim": dim},
                              "batch_size": batch_size, "num_prompts": n})
    return root


def write_sharded_dataset(root: Path, n: int, steps: int, shape, dim: int, batch_size: int = 8,
                          dtype=torch.float16, samples_per_shard: int | None = None) -> Path:
    """The same random dataset in the sharded format stage 2 writes (written loose, then converted)."""
    from golden_noise.dataset.convert import convert_dataset

    loose = write_loose_dataset(root.with_name(root.name + "-loose"), n, steps, shape, dim, batch_size, dtype)
    convert_dataset(loose, root, samples_per_shard)
    return root


def loader_rate(dataset, batch_size: int, workers: int, min_samples: int) -> float:
    """Samples/s of the trainer's training loader (its EpochSampler order, collate, persistent workers) over at
    least `min_samples` samples, workers started and the first batch read outside the timing."""
    from torch.utils.data import DataLoader

    from golden_noise.dataset.reader import collate
    from golden_noise.training.core import EpochSampler

    sampler = EpochSampler(len(dataset), 42)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(42))
    for _ in loader:  # warm-up: worker start, page cache
        break
    seen, epoch, t0 = 0, 0, time.perf_counter()
    while seen < min_samples:
        epoch += 1
        sampler.set_epoch(epoch)
        for batch in loader:
            seen += batch["source"].shape[0]
    return seen / (time.perf_counter() - t0)


def median(values):
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def bench_args(doc: str) -> argparse.ArgumentParser:
    """A parser with the flags every bench has: --quick, --json, --threads; its description is the first paragraph
    of the bench's docstring `doc` (golden_noise.cli.parser, as every CLI's)."""
    from golden_noise.cli import parser

    p = parser(doc)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: seconds, for smoke tests")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def setup(threads=None) -> None:
    """Quiet logs, offline hub, thread count (an int, or parsed args with a `threads` attribute)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = getattr(threads, "threads", threads)
    if threads:
        torch.set_num_threads(threads)
    from golden_noise.runtime import quiet_libraries

    quiet_libraries()
    try:  # also where transformers is missing (the GPU machine), which quiet_libraries needs
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass


def print_table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    """Print dict rows as an aligned text table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return "-" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def finish(results: dict, args, checks: dict[str, bool] | None = None) -> int:
    """Print the ratios and the target checks, write --json, return 0."""
    print("\nratios:")
    for k, v in results.get("ratios", {}).items():
        print(f"  {k} = {v:.4g}" if isinstance(v, float) else f"  {k} = {v}")
    if checks:
        results["checks"] = checks
        print("targets:")
        for k, ok in checks.items():
            print(f"  [{'ok' if ok else 'MISSED'}] {k}")
    results["environment"] = environment()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def environment() -> dict:
    """What the figures were measured on."""
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return env
