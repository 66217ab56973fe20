#!/usr/bin/env python
"""Bench the sweep (golden_noise.sweep.run_sweep, what scripts/sweep.py runs): the share of its wall time spent
inside UNet and VAE forwards on the toy world, per batch size (target >= 0.9 at batch >= 8), and where the rest
goes (pipeline load, text encoders, scoring, statistics/plots/report).

    python bench/bench_sweep.py              # worlds/toy_shapes, 96 prompts, batch 8 and 48
    python bench/bench_sweep.py --quick      # 8 prompts, batch 8, 4 steps: seconds

The pipeline's UNet forward (sampling and the oracle's golden steps), VAE decode and text encoders are timed by
wrapping them on the one pipeline the sweep loads; each batch size runs a fresh sweep into a temporary folder. Without
--rnn_weights_path an RNN of the quickstart's architecture with random weights stands in (same cost as a trained
one).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402  (bench/common.py; this script's folder is on sys.path)

import torch  # noqa: E402

from golden_noise.cli import finite_float  # noqa: E402  (NaN and infinities are refused)


def parse_args(argv=None):
    p = common.bench_args(__doc__)
    p.add_argument("--world", default=str(common.ROOT / "worlds" / "toy_shapes"), help="toy world directory")
    p.add_argument("--rnn_weights_path", default=None, help="an RNN export for the world (default: random weights)")
    p.add_argument("--num_prompts", type=int, default=None, help="prompts of the world's prompts.txt (default 96, "
                   "quick 8)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=None, help="sweep --batch_size values (default "
                   "8 48, quick 8)")
    p.add_argument("--guidance_scales", type=finite_float, nargs="+", default=[1.0, 5.5], help="sweep grid")
    p.add_argument("--num_inference_steps", type=int, nargs="+", default=None, help="sweep grid (default 20, "
                   "quick 4)")
    p.add_argument("--num_gen_steps", type=int, nargs="+", default=[2], help="sweep grid")
    p.add_argument("--methods", nargs="+", default=["standard", "gnsnet", "oracle", "best_of_4"], help="sweep grid")
    args = p.parse_args(argv)
    args.num_prompts = args.num_prompts or (8 if args.quick else 96)
    args.batch_sizes = args.batch_sizes or ([8] if args.quick else [8, 48])
    args.num_inference_steps = args.num_inference_steps or ([4] if args.quick else [20])
    if args.threads is None:
        args.threads = 1  # stable ratios on shared CPUs
    return args


def random_export(world: str, folder: Path) -> Path:
    """An RNN export for `world` with the quickstart's architecture and random weights (its change head too)."""
    from golden_noise.diffusion import load_pipeline
    from golden_noise.golden import GoldenConfig, golden_step
    from golden_noise.model.rnn_seq_model_v3 import NoiseSequenceRNN_v3, NoiseSequenceRNNConfig
    from golden_noise.dataset.generate import GenerationSettings, build_run_config

    pipe = load_pipeline(world, dtype="float32", device="cpu")
    settings = GenerationSettings(base_model_id=world, num_steps=2, text_embedding="pooled+mean_token")
    run_config = build_run_config(pipe, settings, golden_step(pipe, GoldenConfig()))
    c, h, _ = run_config["latent_shape"]
    config = NoiseSequenceRNNConfig(latent_channels=c, noise_resolution=h,
                                    text_embed_dim=run_config["text_embedding"]["dim"], text_proj_dim=64,
                                    cnn_base_filters=32, cnn_num_blocks=[2, 2], cnn_feat_dim=128,
                                    gru_hidden_size=256, gru_num_layers=1)
    torch.manual_seed(0)
    model = NoiseSequenceRNN_v3(config)
    torch.nn.init.normal_(model.mean_head.weight, std=0.02)
    stem = folder / "rnn_v3_model_final"
    model.save_pretrained(stem, extra={"run_config": run_config})
    return stem


class Timed:
    """Adds up the wall time of calls to `obj.name` (an instance attribute wraps the method, as common.UNetTimer
    does: the module and the pipeline are otherwise untouched)."""

    def __init__(self, obj, name: str, totals: dict, key: str):
        inner, device = getattr(obj, name), getattr(obj, "device", "cpu")

        def timed(*args, **kwargs):
            common.sync(device)
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            common.sync(device)
            totals[key] += time.perf_counter() - t0
            return out

        setattr(obj, name, timed)


def timing_loader(totals: dict):
    """A stand-in for inference.config.load_job_pipelines that times the denoiser forward, the VAE decode and the
    text encoders of the pipelines it loads (the sweep loads them once)."""
    from golden_noise.diffusion import family_of
    from golden_noise.inference import config

    real = config.load_job_pipelines

    def load(*args, **kwargs):
        pipe, sampler = real(*args, **kwargs)
        modules = {}
        for p in (pipe, sampler):
            modules[id(family_of(p).denoiser)] = (family_of(p).denoiser, "forward", "unet")
            modules[id(p.vae)] = (p.vae, "decode", "vae")
            for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                if getattr(p, name, None) is not None:
                    modules[id(getattr(p, name))] = (getattr(p, name), "forward", "text")
        for module, method, key in modules.values():
            Timed(module, method, totals, key)
        return pipe, sampler

    return load


def run_one(args, export: str, batch_size: int, out: Path) -> dict:
    """One fresh sweep at `batch_size`, timed."""
    from golden_noise.evaluation import Metric
    from golden_noise.inference.config import PipelineSpec
    from golden_noise.sweep import run as sweep_run
    from golden_noise.sweep.job import SweepJob

    job = SweepJob(prompt_file=str(Path(args.world) / "prompts.txt"), output_dir=str(out),
                   guidance_scales=args.guidance_scales, num_inference_steps=args.num_inference_steps,
                   num_gen_steps=args.num_gen_steps, methods=args.methods, max_prompts=args.num_prompts,
                   metrics=[Metric("toy_attributes", "toy_attributes", {"path": args.world, "device": "cpu"})],
                   start_seed=1_000_000, batch_size=batch_size, rnn_weights_path=export,
                   pipeline=PipelineSpec(base_model_id=args.world, device="cpu"), bootstrap_samples=2000,
                   progress=False)
    seconds = {"unet": 0.0, "vae": 0.0, "text": 0.0}
    real = sweep_run.load_job_pipelines  # the name the sweep calls (inference.config's function)
    sweep_run.load_job_pipelines = timing_loader(seconds)
    try:
        t0 = time.perf_counter()
        result = sweep_run.run_sweep(job)
        wall = time.perf_counter() - t0
    finally:
        sweep_run.load_job_pipelines = real
    t = result["timings"]
    inside = seconds["unet"] + seconds["vae"]
    return {"batch": batch_size, "wall_s": wall, "unet_s": seconds["unet"], "vae_s": seconds["vae"],
            "text_s": seconds["text"], "load_s": t["load_seconds"], "images_s": t["images_seconds"],
            "scoring_s": t["scoring_seconds"], "table_s": t["table_seconds"],
            "plots_report_s": t["analysis_seconds"] - t["table_seconds"],
            "other_s": wall - t["load_seconds"] - t["images_seconds"] - t["scoring_seconds"] - t["analysis_seconds"],
            "share": inside / wall, "share_of_image_phase": inside / t["images_seconds"]}


def main(args) -> int:
    common.setup(args.threads)
    from golden_noise.runtime import setup_logging

    setup_logging(main_process=False)  # warnings only: the sweep's per-unit log lines would drown the table
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export = args.rnn_weights_path or str(random_export(args.world, Path(tmp)))
        for b in args.batch_sizes:
            rows.append(run_one(args, export, b, Path(tmp) / f"sweep_b{b}"))
    common.print_table(rows, ["batch", "wall_s", "unet_s", "vae_s", "text_s", "load_s", "images_s", "scoring_s",
                              "table_s", "plots_report_s", "other_s", "share", "share_of_image_phase"],
                       f"run_sweep on {Path(args.world).name}: {args.num_prompts} prompts, guidance "
                       f"{args.guidance_scales}, steps {args.num_inference_steps}, n {args.num_gen_steps}, "
                       f"{' '.join(args.methods)}; {torch.get_num_threads()} thread(s)")
    ratios = {f"unet_vae_share_of_sweep_wall_time[batch={r['batch']}]": r["share"] for r in rows}
    ratios.update({f"unet_vae_share_of_image_phase[batch={r['batch']}]": r["share_of_image_phase"] for r in rows})
    checks = {">= 90% of the sweep's wall time in UNet and VAE forwards at batch >= 8":
              all(r["share"] >= 0.9 for r in rows if r["batch"] >= 8)}
    results = {"bench": "sweep", "quick": args.quick, "world": args.world, "rows": rows, "ratios": ratios}
    return common.finish(results, args, checks)


if __name__ == "__main__":
    sys.exit(main(parse_args()))
